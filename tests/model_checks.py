"""Checks and set-ups of models that several test files share."""
from __future__ import annotations

import torch
from torch import nn

from simclrv2.models import count_parameters


def bn_stats(module: nn.Module) -> int:
    """Number of batch-norm running statistics (the official code counts them as non-trainable)."""
    return sum(b.numel() for n, b in module.named_buffers() if n.endswith(("running_mean", "running_var")))


def assert_official_counts(model: nn.Module, row: dict, name: str) -> None:
    """Encoder, projection head and 1000-way head sizes equal a ``param_counts.json`` row."""
    assert count_parameters(model.encoder) == row["encoder_trainable"], name
    assert bn_stats(model.encoder) == row["encoder_non_trainable"], name
    assert count_parameters(model.projection_head) == row["proj_head_trainable"], name
    assert bn_stats(model.projection_head) == row["proj_head_non_trainable"], name
    assert count_parameters(model.supervised_head) == row["supervised_head_1000_trainable"], name


def randomize_(model: nn.Module, seed: int, scale: float) -> nn.Module:
    """Non-trivial weights and BN statistics (positive running variances), in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5 if name.endswith("running_var")
                             else scale * torch.randn(tensor.shape, generator=generator))
    return model
