"""ResNet encoders of SimCLRv2 (paper section 2 and Table 1; official ``tf2/resnet.py``).

The layer semantics follow the official TensorFlow code, not torchvision:

* channels are ``int(64 * w)``, ``int(128 * w)``, ... for a float width multiplier ``w``; the
  ResNet-D stem uses ``int(64 * w // 2)`` for its first two convs;
* every block group starts with a projection shortcut, even group 1 of ResNet-18/34 at stride 1
  (torchvision has none there);
* stride sits on the 3x3 conv of the bottleneck (ResNet v1.5);
* ``sk_ratio > 0`` is one switch for three things: selective-kernel 3x3 convs (bottleneck blocks
  only), the 3-conv ResNet-D stem (not with the CIFAR stem) and ResNet-D projection shortcuts
  (average pool, then a stride-1 1x1 conv);
* TF ``SAME`` padding is reproduced: the stem max-pool pads bottom/right for even inputs, and the
  stride-1 ResNet-D shortcut pool pads bottom/right and leaves the padding out of the average;
* BatchNorm: eps 1e-5, momentum 0.1 (TF decay 0.9); the last BN of every residual branch starts
  with gamma = 0. PyTorch updates ``running_var`` with the unbiased batch variance where TF uses
  the biased one, a known difference of factor n/(n-1) in the moving statistics only;
* inputs are RGB floats in [0, 1] with no mean/std normalisation.

ReLUs and the residual add run in place on the fresh BN outputs (never on a block's input),
which spares two activation-sized allocations per block: ~7 % faster training steps on CPU.

Module names (kept close to torchvision so weights can be mapped; see ``convert/official_keys.py`` for
the TF checkpoint keys)::

    stem.conv1, stem.bn1                 standard 7x7/2 stem or CIFAR 3x3/1 stem
    stem.conv1..3, stem.bn1..3           ResNet-D stem (sk_ratio > 0, not CIFAR)
    stem.pool                            TF-SAME 3x3/2 max-pool (Identity for the CIFAR stem)
    layer{1-4}.{b}.conv1, bn1, conv2, bn2[, conv3, bn3]    basic / bottleneck blocks
    layer{1-4}.{b}.conv2.{conv, bn, fc1, fc_bn, fc2}       selective-kernel conv (bn2 is None)
    layer{1-4}.0.downsample.{0: conv, 1: bn}               projection shortcut
    layer{1-4}.0.downsample.{0: pool, 1: conv, 2: bn}      ResNet-D projection shortcut

Against torchvision's ``resnet50`` the names match except ``conv1``/``bn1`` -> ``stem.conv1``/
``stem.bn1`` (and torchvision's ``fc``, which has no counterpart here).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention; equals TF/Keras batch_norm_decay=0.9.
SK_MIN_DIM = 32
_TRUNC_NORMAL_STD_CORRECTION = 0.87962566103423978  # std of N(0,1) truncated to [-2, 2]

RESNET_SPECS: Dict[int, Tuple[str, List[int]]] = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
    152: ("bottleneck", [3, 8, 36, 3]),
    200: ("bottleneck", [3, 24, 36, 3]),
}


def tf_same_padding(size: int, kernel_size: int, stride: int) -> Tuple[int, int]:
    """(before, after) padding of TF ``padding='SAME'`` along one axis of length ``size``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


def init_conv_(weight: torch.Tensor) -> torch.Tensor:
    """TF ``VarianceScaling()`` init: fan-in, scale 1, normal truncated at 2 std (official convs)."""
    fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
    std = math.sqrt(1.0 / fan_in) / _TRUNC_NORMAL_STD_CORRECTION
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def conv2d(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """Bias-free conv equal to the official ``Conv2dFixedPadding``.

    Strided convs pad ``(k-1)//2`` on both sides and stride-1 convs use SAME; for odd ``k`` both
    are PyTorch's symmetric ``padding=k//2``.
    """
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    init_conv_(conv.weight)
    return conv


def batch_norm2d(channels: int, zero_init: bool = False) -> nn.BatchNorm2d:
    """BN of the official ``BatchNormRelu`` (eps 1e-5, decay 0.9), gamma 0 if ``zero_init``."""
    bn = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
    if zero_init:
        nn.init.zeros_(bn.weight)
    return bn


def _same_pads(x: torch.Tensor, kernel_size: int, stride: int) -> Tuple[int, int, int, int]:
    """``F.pad`` order (left, right, top, bottom) of TF ``SAME`` padding for ``x``'s height and width."""
    top, bottom = tf_same_padding(x.shape[-2], kernel_size, stride)
    left, right = tf_same_padding(x.shape[-1], kernel_size, stride)
    return left, right, top, bottom


class MaxPool2dSame(nn.Module):
    """Max-pool with TF ``SAME`` padding (pads with -inf; bottom/right get the extra cell)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = _same_pads(x, self.kernel_size, self.stride)
        if any(pads):
            x = F.pad(x, pads, value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class AvgPool2dSame(nn.Module):
    """Average pool with TF ``SAME`` padding; padded cells are left out of each average."""

    def __init__(self, kernel_size: int = 2, stride: int = 1) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = _same_pads(x, self.kernel_size, self.stride)
        if not any(pads):
            return F.avg_pool2d(x, self.kernel_size, self.stride)
        summed = F.avg_pool2d(F.pad(x, pads), self.kernel_size, self.stride)
        valid = F.avg_pool2d(F.pad(x.new_ones((1, 1) + tuple(x.shape[-2:])), pads), self.kernel_size, self.stride)
        return summed / valid


class FixedPadAvgPool2d(nn.Module):
    """Official stride-2 ResNet-D pool: ``FixedPadding(2)`` (one zero row/column bottom/right),
    then a VALID 2x2/2 average (padding counted). For even sizes this is ``AvgPool2d(2, 2)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 2, 2)


def projection_shortcut(in_ch: int, out_ch: int, stride: int, resnet_d: bool) -> nn.Sequential:
    """Projection shortcut of the first block of each group (official ``projection_layers``)."""
    if resnet_d:
        pool: nn.Module = FixedPadAvgPool2d() if stride > 1 else AvgPool2dSame(2, 1)
        return nn.Sequential(pool, conv2d(in_ch, out_ch, 1), batch_norm2d(out_ch))
    return nn.Sequential(conv2d(in_ch, out_ch, 1, stride), batch_norm2d(out_ch))


class SelectiveKernelConv(nn.Module):
    """Selective-kernel 3x3 conv (official ``SK_Conv2D``; Li et al. 2019, arXiv:1903.06586).

    One 3x3 conv to ``2*f`` channels + BN-ReLU gives two streams (first and second half of the
    channels); their sum is averaged over space, squeezed to ``max(int(f*sk_ratio), 32)`` channels
    (1x1 conv, BN-ReLU), expanded to ``2*f`` mixing logits (1x1 conv), and a softmax across the
    two streams weights them.
    """

    def __init__(self, in_ch: int, filters: int, stride: int, sk_ratio: float, min_dim: int = SK_MIN_DIM) -> None:
        super().__init__()
        mid = max(int(filters * sk_ratio), min_dim)
        self.conv = conv2d(in_ch, 2 * filters, 3, stride)
        self.bn = batch_norm2d(2 * filters)
        self.fc1 = conv2d(filters, mid, 1)
        self.fc_bn = batch_norm2d(mid)
        self.fc2 = conv2d(mid, 2 * filters, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        streams = F.relu(self.bn(self.conv(x)))
        a, b = streams.chunk(2, dim=1)
        context = (a + b).mean(dim=(2, 3), keepdim=True)
        logits = self.fc2(F.relu(self.fc_bn(self.fc1(context))))
        weights = torch.stack(logits.chunk(2, dim=1)).softmax(dim=0)
        return a * weights[0] + b * weights[1]


class BasicBlock(nn.Module):
    """Two 3x3 convs (official ``ResidualBlock``); the second BN starts with gamma = 0."""

    expansion = 1

    def __init__(self, in_ch: int, filters: int, stride: int, use_projection: bool, sk_ratio: float) -> None:
        super().__init__()
        self.conv1 = conv2d(in_ch, filters, 3, stride)
        self.bn1 = batch_norm2d(filters)
        self.conv2 = conv2d(filters, filters, 3)
        self.bn2 = batch_norm2d(filters, zero_init=True)
        self.downsample = projection_shortcut(in_ch, filters, stride, sk_ratio > 0) if use_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu_(out.add_(shortcut))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, or selective-kernel) -> 1x1 x4 block (official ``BottleneckBlock``)."""

    expansion = 4

    def __init__(self, in_ch: int, filters: int, stride: int, use_projection: bool, sk_ratio: float) -> None:
        super().__init__()
        out_ch = 4 * filters
        self.conv1 = conv2d(in_ch, filters, 1)
        self.bn1 = batch_norm2d(filters)
        self.conv2: nn.Module
        self.bn2: Optional[nn.BatchNorm2d]
        if sk_ratio > 0:
            self.conv2 = SelectiveKernelConv(filters, filters, stride, sk_ratio)
            self.bn2 = None
        else:
            self.conv2 = conv2d(filters, filters, 3, stride)
            self.bn2 = batch_norm2d(filters)
        self.conv3 = conv2d(filters, out_ch, 1)
        self.bn3 = batch_norm2d(out_ch, zero_init=True)
        self.downsample = projection_shortcut(in_ch, out_ch, stride, sk_ratio > 0) if use_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu_(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        if self.bn2 is not None:
            out = F.relu_(self.bn2(out))
        out = self.bn3(self.conv3(out))
        return F.relu_(out.add_(shortcut))


class Stem(nn.Module):
    """Official ``initial_conv_relu_max_pool``: CIFAR 3x3/1 conv (no pool), standard 7x7/2 conv +
    3x3/2 SAME max-pool, or the ResNet-D stem (three 3x3 convs) + max-pool when ``sk_ratio > 0``."""

    def __init__(self, width_multiplier: float, cifar_stem: bool, resnet_d: bool) -> None:
        super().__init__()
        channels = int(64 * width_multiplier)
        self.deep = resnet_d and not cifar_stem
        if cifar_stem:
            self.conv1 = conv2d(3, channels, 3, 1)
            self.bn1 = batch_norm2d(channels)
            self.pool: nn.Module = nn.Identity()
            return
        if self.deep:
            half = int(64 * width_multiplier // 2)
            self.conv1 = conv2d(3, half, 3, 2)
            self.bn1 = batch_norm2d(half)
            self.conv2 = conv2d(half, half, 3, 1)
            self.bn2 = batch_norm2d(half)
            self.conv3 = conv2d(half, channels, 3, 1)
            self.bn3 = batch_norm2d(channels)
        else:
            self.conv1 = conv2d(3, channels, 7, 2)
            self.bn1 = batch_norm2d(channels)
        self.pool = MaxPool2dSame(3, 2)

    def forward_intermediates(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (``initial_conv``: last conv output before its BN, ``initial_max_pool``)."""
        if self.deep:
            x = F.relu_(self.bn1(self.conv1(x)))
            x = F.relu_(self.bn2(self.conv2(x)))
            conv = self.conv3(x)
            x = F.relu_(self.bn3(conv))
        else:
            conv = self.conv1(x)
            x = F.relu_(self.bn1(conv))
        return conv, self.pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x)[1]


class ResNet(nn.Module):
    """SimCLRv2 encoder: ``forward(x)`` maps (N, 3, H, W) in [0, 1] to pooled (N, out_dim) features."""

    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        layers: List[int],
        width_multiplier: float = 1.0,
        sk_ratio: float = 0.0,
        cifar_stem: bool = False,
        depth: Optional[int] = None,
    ) -> None:
        super().__init__()
        if int(64 * width_multiplier) < 1:
            raise ValueError(f"width_multiplier={width_multiplier} gives 0 stem channels; use a width >= 1/64")
        if sk_ratio < 0:
            raise ValueError(f"sk_ratio must be >= 0 (0 turns selective kernels off), got {sk_ratio}")
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must list 4 positive block counts, got {layers}")
        self.depth = depth
        self.width_multiplier = width_multiplier
        self.sk_ratio = sk_ratio
        self.cifar_stem = cifar_stem
        self.block_type = block
        self.stem = Stem(width_multiplier, cifar_stem, resnet_d=sk_ratio > 0)
        in_ch = int(64 * width_multiplier)
        groups = []
        for index, (base, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            filters = int(base * width_multiplier)
            stride = 1 if index == 0 else 2
            group = []
            for b in range(blocks):
                group.append(block(in_ch, filters, stride if b == 0 else 1, b == 0, sk_ratio))
                in_ch = filters * block.expansion
            groups.append(nn.Sequential(*group))
        self.layer1, self.layer2, self.layer3, self.layer4 = groups
        self.out_dim = in_ch

    def forward_intermediates(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The official salient tensors (``run.build_saved_model``), NCHW."""
        conv, x = self.stem.forward_intermediates(x)
        out = {"initial_conv": conv, "initial_max_pool": x}
        for g, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            x = layer(x)
            out[f"block_group{g}"] = x
        out["final_avg_pool"] = x.mean(dim=(2, 3))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


def build_resnet(depth: int, width_multiplier: float = 1.0, sk_ratio: float = 0.0, cifar_stem: bool = False) -> ResNet:
    """ResNet-``depth`` of the official ``resnet.resnet`` (depths in ``RESNET_SPECS``)."""
    if depth not in RESNET_SPECS:
        raise ValueError(f"unknown ResNet depth {depth}; choose one of {sorted(RESNET_SPECS)}")
    kind, layers = RESNET_SPECS[depth]
    block = BasicBlock if kind == "basic" else Bottleneck
    return ResNet(block, list(layers), width_multiplier, sk_ratio, cifar_stem, depth=depth)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameter elements (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
