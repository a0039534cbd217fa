"""Map official TF2 SimCLRv2 checkpoint keys to this package's parameters and buffers.

The official ``run.py`` saves ``tf.train.Checkpoint(model=..., global_step=..., optimizer=...)``,
whose object-based keys are structural (``model/resnet_model/block_groups/{g}/layers/{b}/...``)
and, unlike the Keras variable names, do not depend on construction order. ``official_key_map``
walks a model built here and lists, for every official key (without the
``/.ATTRIBUTES/VARIABLE_VALUE`` suffix), the matching ``state_dict`` name and the layout change:

* ``"conv"``: HWIO kernel -> OIHW (``permute(3, 2, 0, 1)``);
* ``"dense"``: (in, out) kernel -> (out, in) (transpose);
* ``"none"``: vectors (BN gamma/beta/moving statistics, biases).

Optimizer slots (``.OPTIMIZER_SLOT``), ``global_step`` and ``save_counter`` have no counterpart.
Indices inside the official layer lists (see ``tf2/resnet.py``): the stem list holds
conv 0 / bn 2 (max-pool 3), or conv 0, bn 1, conv 2, bn 3, conv 4, bn 6 for the ResNet-D stem;
bottleneck ``conv_relu_dropblock_layers`` hold conv 0, bn 1, conv 3, bn 4, conv 6, bn 7 (with
SK: conv 0, bn 1, SK 3, conv 5, bn 6); basic ``conv2d_bn_layers`` conv 0, bn 1, conv 2, bn 3;
projection shortcuts conv 0, bn 1, or with ResNet-D [pad 0,] pool, conv, bn.
"""
from __future__ import annotations

from typing import Dict, Iterator, Mapping, Tuple

import numpy as np
import torch
from torch import nn

from simclrv2.models.heads import ProjectionHead, SupervisedHead
from simclrv2.models.resnet import BasicBlock, Bottleneck, FixedPadAvgPool2d, ResNet, SelectiveKernelConv
from simclrv2.models.simclr import SimCLRv2Model

CHECKPOINT_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
TRANSFORMS = ("conv", "dense", "none")
KeyMap = Dict[str, Tuple[str, str]]
_Entry = Tuple[str, Tuple[str, str]]

_BN_VARIABLES = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var"))


def strip_checkpoint_suffix(key: str) -> str:
    """``.../kernel/.ATTRIBUTES/VARIABLE_VALUE`` -> ``.../kernel``."""
    return key[: -len(CHECKPOINT_SUFFIX)] if key.endswith(CHECKPOINT_SUFFIX) else key


def is_model_variable_key(key: str) -> bool:
    """True for model weights/statistics; False for optimizer slots, ``global_step`` etc."""
    return key.startswith("model/") and ".OPTIMIZER_SLOT" not in key


def _bn(key: str, name: str, bn: nn.modules.batchnorm._BatchNorm) -> Iterator[_Entry]:
    for tf_var, torch_var in _BN_VARIABLES:
        if getattr(bn, torch_var) is not None:
            yield f"{key}/bn/{tf_var}", (f"{name}.{torch_var}", "none")


def _conv(key: str, name: str) -> Iterator[_Entry]:
    yield f"{key}/conv2d/kernel", (f"{name}.weight", "conv")


def _shortcut(key: str, name: str, downsample: nn.Sequential) -> Iterator[_Entry]:
    if len(downsample) == 2:
        yield from _conv(f"{key}/0", f"{name}.0")
        yield from _bn(f"{key}/1", f"{name}.1", downsample[1])
        return
    first = 2 if isinstance(downsample[0], FixedPadAvgPool2d) else 1  # FixedPadding is a layer
    yield from _conv(f"{key}/{first}", f"{name}.1")
    yield from _bn(f"{key}/{first + 1}", f"{name}.2", downsample[2])


def _sk(key: str, name: str, sk: SelectiveKernelConv) -> Iterator[_Entry]:
    yield f"{key}/conv2d_fixed_padding/conv2d/kernel", (f"{name}.conv.weight", "conv")
    yield from _bn(f"{key}/batch_norm_relu", f"{name}.bn", sk.bn)
    yield f"{key}/conv2d_0/kernel", (f"{name}.fc1.weight", "conv")
    yield from _bn(f"{key}/batch_norm_relu_1", f"{name}.fc_bn", sk.fc_bn)
    yield f"{key}/conv2d_1/kernel", (f"{name}.fc2.weight", "conv")


def _block(key: str, name: str, block: nn.Module) -> Iterator[_Entry]:
    if isinstance(block, Bottleneck):
        main, short = f"{key}/conv_relu_dropblock_layers", f"{key}/projection_layers"
        yield from _conv(f"{main}/0", f"{name}.conv1")
        yield from _bn(f"{main}/1", f"{name}.bn1", block.bn1)
        if isinstance(block.conv2, SelectiveKernelConv):
            yield from _sk(f"{main}/3", f"{name}.conv2", block.conv2)
            last = 5
        else:
            yield from _conv(f"{main}/3", f"{name}.conv2")
            yield from _bn(f"{main}/4", f"{name}.bn2", block.bn2)
            last = 6
        yield from _conv(f"{main}/{last}", f"{name}.conv3")
        yield from _bn(f"{main}/{last + 1}", f"{name}.bn3", block.bn3)
    elif isinstance(block, BasicBlock):
        main, short = f"{key}/conv2d_bn_layers", f"{key}/shortcut_layers"
        yield from _conv(f"{main}/0", f"{name}.conv1")
        yield from _bn(f"{main}/1", f"{name}.bn1", block.bn1)
        yield from _conv(f"{main}/2", f"{name}.conv2")
        yield from _bn(f"{main}/3", f"{name}.bn2", block.bn2)
    else:
        raise TypeError(f"no official key layout for block type {type(block).__name__}")
    if block.downsample is not None:
        yield from _shortcut(short, f"{name}.downsample", block.downsample)


def _encoder(key: str, name: str, resnet: ResNet) -> Iterator[_Entry]:
    stem, stem_key = resnet.stem, f"{key}/initial_conv_relu_max_pool"
    layout = ((0, "conv1"), (1, "bn1"), (2, "conv2"), (3, "bn2"), (4, "conv3"), (6, "bn3")) if stem.deep else ((0, "conv1"), (2, "bn1"))
    for index, attr in layout:
        module = getattr(stem, attr)
        k, n = f"{stem_key}/{index}", f"{name}stem.{attr}"
        yield from (_conv(k, n) if isinstance(module, nn.Conv2d) else _bn(k, n, module))
    for g, layer in enumerate((resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)):
        for b, block in enumerate(layer):
            yield from _block(f"{key}/block_groups/{g}/layers/{b}", f"{name}layer{g + 1}.{b}", block)


def _projection_head(key: str, name: str, head: ProjectionHead) -> Iterator[_Entry]:
    for j, layer in enumerate(head.layers):
        yield f"{key}/linear_layers/{j}/dense/kernel", (f"{name}layers.{j}.linear.weight", "dense")
        for tf_var, torch_var in _BN_VARIABLES:
            if getattr(layer.bn, torch_var) is not None:
                yield f"{key}/linear_layers/{j}/bn_relu/bn/{tf_var}", (f"{name}layers.{j}.bn.{torch_var}", "none")


def _supervised_head(key: str, name: str, head: SupervisedHead) -> Iterator[_Entry]:
    yield f"{key}/linear_layer/dense/kernel", (f"{name}linear.weight", "dense")
    yield f"{key}/linear_layer/dense/bias", (f"{name}linear.bias", "none")


def official_key_map(model: nn.Module) -> KeyMap:
    """``{official checkpoint key (no suffix): (state_dict name, transform)}`` for a
    ``SimCLRv2Model`` (all heads) or a bare ``ResNet`` (encoder keys under ``model/resnet_model``)."""
    if isinstance(model, SimCLRv2Model):
        entries = list(_encoder("model/resnet_model", "encoder.", model.encoder))
        entries += _projection_head("model/_projection_head", "projection_head.", model.projection_head)
        if model.supervised_head is not None:
            entries += _supervised_head("model/supervised_head", "supervised_head.", model.supervised_head)
    elif isinstance(model, ResNet):
        entries = list(_encoder("model/resnet_model", "", model))
    else:
        raise TypeError(f"official_key_map needs a SimCLRv2Model or ResNet, got {type(model).__name__}")
    mapping = dict(entries)
    if len(mapping) != len(entries):
        raise RuntimeError("duplicate official keys in the mapping (a bug in official_keys.py)")
    return mapping


def official_to_torch(array: np.ndarray, transform: str) -> torch.Tensor:
    """One official array in PyTorch layout (see the module docstring for ``transform``)."""
    tensor = torch.as_tensor(np.asarray(array))
    if transform == "conv":
        return tensor.permute(3, 2, 0, 1).contiguous()
    if transform == "dense":
        return tensor.t().contiguous()
    if transform == "none":
        return tensor
    raise ValueError(f"unknown transform {transform!r}; expected one of {TRANSFORMS}")


def torch_to_official(tensor: torch.Tensor, transform: str) -> np.ndarray:
    """Inverse of ``official_to_torch``."""
    tensor = tensor.detach().cpu()
    if transform == "conv":
        tensor = tensor.permute(2, 3, 1, 0)
    elif transform == "dense":
        tensor = tensor.t()
    elif transform != "none":
        raise ValueError(f"unknown transform {transform!r}; expected one of {TRANSFORMS}")
    return np.ascontiguousarray(tensor.numpy())


def official_state_dict(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> Dict[str, torch.Tensor]:
    """State dict for ``model`` from ``{official checkpoint key: array}`` (suffixes optional;
    optimizer slots, ``global_step`` and ``save_counter`` are ignored). Raises ``KeyError`` when a
    model tensor has no official array or an official model array has no tensor, and
    ``ValueError`` on a shape mismatch. Load with ``model.load_state_dict(sd, strict=False)``
    (``num_batches_tracked`` has no official counterpart)."""
    mapping = official_key_map(model)
    given = {strip_checkpoint_suffix(k): v for k, v in arrays.items() if is_model_variable_key(k)}
    unknown = sorted(set(given) - set(mapping))
    missing = sorted(set(mapping) - set(given))
    if unknown or missing:
        raise KeyError(f"official keys without a model tensor: {unknown[:5]}; model tensors without a key: {missing[:5]}")
    targets = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    for key, (name, transform) in mapping.items():
        tensor = official_to_torch(given[key], transform)
        if tuple(tensor.shape) != tuple(targets[name].shape):
            raise ValueError(f"{key}: shape {tuple(tensor.shape)} does not fit {name} {tuple(targets[name].shape)}")
        out[name] = tensor.to(targets[name].dtype)
    return out
