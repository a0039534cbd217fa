"""Infer a SimCLRv2 architecture from the structural keys and shapes of an official TF2 checkpoint.

Input: ``{key: shape}`` for every model variable, keys as ``official_keys`` writes them (no
``/.ATTRIBUTES/VARIABLE_VALUE`` suffix) and shapes in TF layout (conv kernels HWIO, dense kernels
(in, out)). Output: a ``ModelSpec``. Everything is read from the keys
(official ``tf2/resnet.py`` and ``tf2/model.py`` layer lists):

* stem: ``initial_conv_relu_max_pool/4`` exists -> ResNet-D stem; else a 3x3 first conv -> CIFAR
  stem, a 7x7 one -> standard stem;
* depth: blocks per group and block type (``conv_relu_dropblock_layers`` = bottleneck,
  ``conv2d_bn_layers`` = basic) looked up in ``RESNET_SPECS``;
* width: the last group has ``int(512 * w)`` filters, so ``w = filters / 512`` reproduces every
  channel count ``int(64 * w)``, ``int(128 * w)``, ... (the smallest such multiplier);
* SK: ResNet-D shortcuts (a pool before the 1x1 conv) or a ResNet-D stem mean ``sk_ratio > 0``;
  the ratio comes from the selective-kernel squeeze widths ``max(int(f * r), 32)``
  (0.0625, the paper's value, when it fits or when no SK conv says otherwise);
* heads: the number of ``linear_layers`` and the last one's width; the supervised head's shape
  gives the class count and which projection-head hidden it reads.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Sequence, Tuple

from simclrv2.models import ModelSpec
from simclrv2.models.resnet import RESNET_SPECS, SK_MIN_DIM

ENCODER = "model/resnet_model"
STEM = f"{ENCODER}/initial_conv_relu_max_pool"
HEAD = "model/_projection_head/linear_layers"
SUPERVISED_KERNEL = "model/supervised_head/linear_layer/dense/kernel"
PAPER_SK_RATIO = 0.0625
_BLOCK = re.compile(rf"^{ENCODER}/block_groups/(\d+)/layers/(\d+)/(conv_relu_dropblock_layers|conv2d_bn_layers)/")
_HEAD_LAYER = re.compile(rf"^{HEAD}/(\d+)/dense/kernel$")

Shapes = Mapping[str, Sequence[int]]


class ArchitectureError(ValueError):
    """The checkpoint's keys do not describe a SimCLRv2 model this package can build."""


def _shape(shapes: Shapes, key: str) -> Tuple[int, ...]:
    if key not in shapes:
        raise ArchitectureError(f"checkpoint has no variable {key}; is it an official SimCLRv2 TF2 checkpoint?")
    return tuple(int(d) for d in shapes[key])


def _stem(shapes: Shapes) -> Tuple[bool, bool]:
    """(cifar_stem, resnet_d_stem)."""
    if f"{STEM}/4/conv2d/kernel" in shapes:
        return False, True
    size = _shape(shapes, f"{STEM}/0/conv2d/kernel")[0]
    if size not in (3, 7):
        raise ArchitectureError(f"stem conv is {size}x{size}; official stems are 7x7 (standard) or 3x3 (CIFAR)")
    return size == 3, False


def _groups(shapes: Shapes) -> Tuple[str, list]:
    """(block kind, blocks per group)."""
    found: Dict[int, set] = {}
    kinds = set()
    for key in shapes:
        match = _BLOCK.match(key)
        if match:
            found.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
            kinds.add(match.group(3))
    if sorted(found) != [0, 1, 2, 3]:
        raise ArchitectureError(f"expected block groups 0-3 under {ENCODER}/block_groups, found {sorted(found)}")
    if len(kinds) != 1:
        raise ArchitectureError("checkpoint mixes bottleneck and basic blocks; no official ResNet does")
    counts = []
    for g in range(4):
        blocks = sorted(found[g])
        if blocks != list(range(len(blocks))):
            raise ArchitectureError(f"block group {g} has blocks {blocks}; expected 0..{len(blocks) - 1}")
        counts.append(len(blocks))
    return ("bottleneck" if kinds == {"conv_relu_dropblock_layers"} else "basic"), counts


def _depth(kind: str, counts: list) -> int:
    for depth, (spec_kind, spec_counts) in RESNET_SPECS.items():
        if spec_kind == kind and list(spec_counts) == counts:
            return depth
    raise ArchitectureError(f"{kind} blocks per group {counts} match no supported ResNet depth ({sorted(RESNET_SPECS)})")


def _sk_ratio(shapes: Shapes, resnet_d: bool, kind: str) -> float:
    squeeze = [(tuple(shape)[2], tuple(shape)[3]) for key, shape in shapes.items()
               if key.startswith(f"{ENCODER}/block_groups/") and key.endswith("/conv2d_0/kernel")]
    if kind == "bottleneck" and resnet_d != bool(squeeze):
        raise ArchitectureError("checkpoint has ResNet-D parts without selective-kernel convs (or the reverse); the "
                                "official code switches both with sk_ratio > 0")
    if not resnet_d:
        return 0.0
    if not squeeze or all(mid == max(int(f * PAPER_SK_RATIO), SK_MIN_DIM) for f, mid in squeeze):
        return PAPER_SK_RATIO
    wide = [(f, mid) for f, mid in squeeze if mid > SK_MIN_DIM]
    ratio = wide[0][1] / wide[0][0] if wide else SK_MIN_DIM / max(f for f, _ in squeeze)
    if not all(mid == max(int(f * ratio), SK_MIN_DIM) for f, mid in squeeze):
        raise ArchitectureError(f"selective-kernel squeeze widths {sorted(set(squeeze))} fit no single sk_ratio")
    return ratio


def _has_resnet_d_shortcut(shapes: Shapes, kind: str) -> bool:
    """The first block's shortcut has its conv after a pool (index 1 or 2) under ResNet-D."""
    short = "projection_layers" if kind == "bottleneck" else "shortcut_layers"
    base = f"{ENCODER}/block_groups/0/layers/0/{short}"
    return f"{base}/1/conv2d/kernel" in shapes or f"{base}/2/conv2d/kernel" in shapes


def _selector(hidden_dims: list, in_dim: int, requested: Optional[int]) -> int:
    layers = len(hidden_dims) - 1
    if requested is not None:
        if not -1 <= requested <= layers:
            raise ArchitectureError(f"--ft-proj-selector {requested} is outside the {layers}-layer projection head; "
                                    f"use -1 or 0..{layers}")
        if hidden_dims[requested] != in_dim:
            raise ArchitectureError(f"the supervised head reads {in_dim} features but --ft-proj-selector {requested} "
                                    f"selects a hidden of width {hidden_dims[requested]}; widths are {hidden_dims}")
        return requested
    if hidden_dims[0] == in_dim:
        return 0
    if hidden_dims[-1] == in_dim:
        return -1
    raise ArchitectureError(f"the supervised head reads {in_dim} features, matching no projection-head hidden "
                            f"(widths {hidden_dims})")


def infer_architecture(shapes: Shapes, ft_proj_selector: Optional[int] = None) -> ModelSpec:
    """The spec of the model whose variables have these ``shapes``.

    ``ft_proj_selector`` says which hidden the supervised head reads (official flag of the same
    name); by default 0 (the official default) when the widths allow it, else -1.
    """
    cifar_stem, deep_stem = _stem(shapes)
    kind, counts = _groups(shapes)
    depth = _depth(kind, counts)
    first = "conv_relu_dropblock_layers/0" if kind == "bottleneck" else "conv2d_bn_layers/0"
    filters = _shape(shapes, f"{ENCODER}/block_groups/3/layers/0/{first}/conv2d/kernel")[3]
    width = filters / 512
    if int(64 * width) < 1:
        raise ArchitectureError(f"last block group has {filters} filters, too narrow for a stem of >= 1 channel")
    resnet_d = deep_stem or _has_resnet_d_shortcut(shapes, kind)
    sk_ratio = _sk_ratio(shapes, resnet_d, kind)
    out_dim = filters * (4 if kind == "bottleneck" else 1)
    layers = sorted(int(m.group(1)) for key in shapes if (m := _HEAD_LAYER.match(key)))
    if layers != list(range(len(layers))):
        raise ArchitectureError(f"projection head layers {layers} are not numbered 0..{len(layers) - 1}")
    proj_out_dim = _shape(shapes, f"{HEAD}/{layers[-1]}/dense/kernel")[1] if layers else 128
    hidden_dims = [out_dim] * len(layers) + [proj_out_dim if layers else out_dim]
    num_classes = None
    selector = 0 if ft_proj_selector is None else ft_proj_selector
    if SUPERVISED_KERNEL in shapes:
        in_dim, num_classes = _shape(shapes, SUPERVISED_KERNEL)
        selector = _selector(hidden_dims, in_dim, ft_proj_selector)
    elif not -1 <= selector <= len(layers):
        raise ArchitectureError(f"--ft-proj-selector {selector} is outside the {len(layers)}-layer projection head")
    return ModelSpec(resnet_depth=depth, width_multiplier=width, sk_ratio=sk_ratio, cifar_stem=cifar_stem,
                     num_proj_layers=len(layers), proj_out_dim=proj_out_dim, ft_proj_selector=selector,
                     num_classes=num_classes)
