"""Projection and supervised heads of SimCLRv2 (paper section 2; official ``tf2/model.py``).

The projection head has ``num_layers`` layers, each Linear (no bias) -> BatchNorm1d -> ReLU. The
middle layers keep the input width and their BN has gamma and beta; the last layer maps to
``out_dim``, its BN has gamma but no beta and no ReLU follows. Fine-tuning starts from one of the
head's hidden layers (paper section 2, "fine-tuning from the middle layer"): ``hiddens`` are
``[x, out_0, out_1, ...]`` and ``ft_proj_selector`` picks one (0 = encoder output, k = after
layer k, -1 = the projection).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import BN_EPS, BN_MOMENTUM

DENSE_INIT_STD = 0.01  # official LinearLayer: RandomNormal(stddev=0.01)


class ProjectionLayer(nn.Module):
    """One official ``LinearLayer(use_bn=True)``: Linear without bias, BN (beta optional), ReLU."""

    def __init__(self, in_dim: int, out_dim: int, center: bool, relu: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.normal_(self.linear.weight, std=DENSE_INIT_STD)
        self.bn = nn.BatchNorm1d(out_dim, eps=BN_EPS, momentum=BN_MOMENTUM)
        if not center:
            self.bn.bias = None  # TF BatchNormalization(center=False): gamma only, no beta
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.linear(x))
        return F.relu(x) if self.relu else x


class ProjectionHead(nn.Module):
    """Official nonlinear ``ProjectionHead``; ``num_layers=0`` is the identity head ('none' mode).

    ``forward(x)`` returns ``(projection, hiddens[ft_proj_selector])``.
    """

    def __init__(self, in_dim: int, num_layers: int = 3, out_dim: int = 128, ft_proj_selector: int = 1) -> None:
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0 (0 = identity head), got {num_layers}")
        self.in_dim = in_dim
        self.num_layers = num_layers
        self.proj_out_dim = out_dim  # as requested; the identity head's output keeps the input width
        self.out_dim = out_dim if num_layers > 0 else in_dim
        self.layers = nn.ModuleList()
        for j in range(num_layers):
            last = j == num_layers - 1
            self.layers.append(ProjectionLayer(in_dim, out_dim if last else in_dim, center=not last, relu=not last))
        self.ft_proj_selector = ft_proj_selector

    @property
    def ft_proj_selector(self) -> int:
        """Which hidden ``forward`` returns second; validated on assignment."""
        return self._ft_proj_selector

    @ft_proj_selector.setter
    def ft_proj_selector(self, value: int) -> None:
        self._resolve(value)
        self._ft_proj_selector = value

    @property
    def hidden_dims(self) -> List[int]:
        """Widths of ``hiddens``: ``[in_dim, in_dim, ..., out_dim]`` (length ``num_layers + 1``)."""
        return [self.in_dim] * self.num_layers + [self.out_dim]

    @property
    def finetune_dim(self) -> int:
        """Width of the hidden selected by ``ft_proj_selector`` (the supervised head's input)."""
        return self.hidden_dims[self.ft_proj_selector]

    def _resolve(self, selector: int) -> int:
        """Maps a selector in [-1, num_layers] to the number of head layers it uses."""
        if not -1 <= selector <= self.num_layers:
            raise ValueError(
                f"ft_proj_selector={selector} is out of range for a {self.num_layers}-layer head; "
                f"use -1 (projection), 0 (encoder output) or 1..{self.num_layers}"
            )
        return self.num_layers if selector == -1 else selector

    def hidden_at(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """``hiddens(x)[k]`` computed with only the first k layers (k = -1: all layers)."""
        for layer in self.layers[: self._resolve(k)]:
            x = layer(x)
        return x

    def hiddens(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``[x, out_0, ..., out_{n-1}]``; the last entry is the projection."""
        out = [x]
        for layer in self.layers:
            out.append(layer(out[-1]))
        return out

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hiddens = self.hiddens(x)
        return hiddens[-1], hiddens[self._resolve(self.ft_proj_selector)]


class SupervisedHead(nn.Module):
    """Linear classifier with bias (official ``SupervisedHead``/``LinearLayer``): N(0, 0.01) kernel,
    zero bias; all zeros if ``zero_init`` (official ``--zero_init_logits_layer``)."""

    def __init__(self, in_dim: int, num_classes: int, zero_init: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.zero_init = zero_init
        self.linear = nn.Linear(in_dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self, zero_init: Optional[bool] = None) -> None:
        """Re-initialises the layer; ``zero_init`` overrides the constructor's choice."""
        if zero_init if zero_init is not None else self.zero_init:
            nn.init.zeros_(self.linear.weight)
        else:
            nn.init.normal_(self.linear.weight, std=DENSE_INIT_STD)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
