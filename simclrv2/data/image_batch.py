"""Conventions every batch transform shares: (N, 1 or 3, H, W) uint8 or float in [0, 1],
grey replicated to RGB, arithmetic in float32."""
from __future__ import annotations

import functools

import torch
from torch import Tensor


def check_batch(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected an image batch of shape (N, 1 or 3, H, W), got {shape}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")


def as_rgb(images: Tensor) -> Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def float32_math(method):
    """Keep image arithmetic in float32 under a caller's autocast: the training step runs inside
    autocast, where fp16 would overflow the resize and colour ops and bf16 would blur colours."""
    @functools.wraps(method)
    def wrapper(self, images: Tensor, *args, **kwargs):
        with torch.autocast(device_type=images.device.type, enabled=False):
            return method(self, images, *args, **kwargs)
    return wrapper
