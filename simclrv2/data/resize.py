"""Crop-and-resize with TensorFlow's half-pixel kernels, per image, on whole batches.

Each image is cut to its own box and resized with separable per-image interpolation (bicubic:
Keys, a = -0.5; or bilinear), taps outside the crop dropped and the weights renormalised, no
antialiasing: ``tf.image.resize`` of the cropped image, as the official ``crop_and_resize`` does.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from simclrv2.data import augment_kernel
from simclrv2.data.image_batch import as_rgb


def _keys_cubic(d: Tensor, a: float = -0.5) -> Tensor:
    d = d.abs()
    d2, d3 = d * d, d * d * d
    near = (a + 2) * d3 - (a + 3) * d2 + 1
    far = a * d3 - 5 * a * d2 + 8 * a * d - 4 * a
    return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def _triangle(d: Tensor) -> Tensor:
    return (1 - d.abs()).clamp(min=0)


_KERNELS: dict[str, tuple[Callable[[Tensor], Tensor], int]] = {"bicubic": (_keys_cubic, 2), "bilinear": (_triangle, 1)}
INTERPOLATIONS = tuple(sorted(_KERNELS))


def interpolation_taps(start: Tensor, length: Tensor, in_size: int, out_size: int,
                       interpolation: str = "bicubic", dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Source indices and weights ``(N, out_size, K)`` resampling the segment ``[start,
    start+length)`` of an axis of ``in_size`` pixels to ``out_size`` pixels (K = 4 bicubic, 2
    bilinear).

    Half-pixel centres: output ``s`` samples source position ``start + (s + 0.5) * length /
    out_size - 0.5``; kernel taps outside the segment get weight 0 and each row is renormalised,
    as TensorFlow's ``resize_bicubic``/``resize_bilinear`` (``half_pixel_centers=True``) do on the
    cropped image. No antialiasing, like ``tf.image.resize(antialias=False)``.
    """
    if interpolation not in _KERNELS:
        raise ValueError(f"interpolation must be one of {sorted(_KERNELS)}, got {interpolation!r}")
    kernel, radius = _KERNELS[interpolation]
    device = start.device
    start = start.to(dtype)[:, None, None]
    length = length.to(dtype)[:, None, None]
    s = torch.arange(out_size, device=device, dtype=dtype)[None, :, None]
    centre = start + (s + 0.5) * length / out_size - 0.5
    taps = torch.floor(centre) + torch.arange(1 - radius, radius + 1, device=device, dtype=dtype)
    weights = kernel(taps - centre) * ((taps >= start) & (taps < start + length))
    return taps.long().clamp(0, in_size - 1), weights / weights.sum(-1, keepdim=True)


def interpolation_matrix(start: Tensor, length: Tensor, in_size: int, out_size: int,
                         interpolation: str = "bicubic", dtype: torch.dtype = torch.float32) -> Tensor:
    """Matrices ``(N, out_size, in_size)`` of :func:`interpolation_taps`."""
    taps, weights = interpolation_taps(start, length, in_size, out_size, interpolation, dtype)
    matrix = torch.zeros(start.shape[0], out_size, in_size, device=start.device, dtype=dtype)
    return matrix.scatter_add_(2, taps, weights)


def _bilinear_grid(start: Tensor, length: Tensor, in_size: int, out_size: int,
                   flip: Optional[Tensor] = None) -> Tensor:
    """``grid_sample`` grids ``(N, 1, out_size, 2)`` for 1-D half-pixel bilinear resampling of the
    segment ``[start, start+length)``. Sample positions are clamped to the segment's first and
    last pixel centres, which is exactly TensorFlow's rule of dropping out-of-crop taps."""
    start, length = start.float()[:, None], length.float()[:, None]
    s = torch.arange(out_size, device=start.device, dtype=torch.float32)
    pos = start + (s + 0.5) * length / out_size - 0.5
    pos = torch.minimum(torch.maximum(pos, start), start + length - 1)
    if flip is not None:
        pos = torch.where(flip[:, None], pos.flip(1), pos)
    x = (pos + 0.5) * (2.0 / in_size) - 1.0  # align_corners=False normalisation
    return torch.stack([x, torch.zeros_like(x)], dim=-1)[:, None]


def _resample_rows(x: Tensor, grid: Tensor) -> Tensor:
    """Resample the last axis of (N, R, L) along ``grid``; returns (N, R, out_size)."""
    out = F.grid_sample(x.unsqueeze(2), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(2)


def resize_boxes(images: Tensor, boxes: Tensor, size: int | tuple[int, int], flip: Optional[Tensor] = None,
                 interpolation: str = "bicubic") -> Tensor:
    """Crop each image to its box ``(y0, x0, h, w)`` and resize to ``size``; optionally flip.

    ``images`` (N, C, H, W) uint8 (scaled to [0, 1]) or float; returns float32 (N, C, *size).
    Both kernels reproduce TensorFlow's half-pixel resize of the cropped image. ``bicubic``
    (official) is two batched matrix products with per-image interpolation matrices; the result
    is not clipped (it overshoots slightly, as in TensorFlow). ``bilinear`` is two 1-D
    ``grid_sample`` passes, about twice as fast on CPU.
    """
    if interpolation not in _KERNELS:
        raise ValueError(f"interpolation must be one of {sorted(_KERNELS)}, got {interpolation!r}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    n, c, height, width = images.shape
    boxes = boxes.to(images.device)
    flip = None if flip is None else flip.to(images.device)
    scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    if interpolation == "bilinear":
        rows = _bilinear_grid(boxes[:, 0], boxes[:, 2], height, out_h)
        cols = _bilinear_grid(boxes[:, 1], boxes[:, 3], width, out_w, flip)
        x = torch.mul(images.transpose(2, 3).contiguous(), scale).float()  # (N, C, W, H)
        y = _resample_rows(x.view(n, c * width, height), rows).view(n, c, width, out_h)
        y = y.transpose(2, 3).contiguous().view(n, c * out_h, width)
        return _resample_rows(y, cols).view(n, c, out_h, out_w)
    rows = interpolation_matrix(boxes[:, 0], boxes[:, 2], height, out_h, interpolation) * scale
    cols = interpolation_matrix(boxes[:, 1], boxes[:, 3], width, out_w, interpolation)
    if flip is not None:
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    x = torch.bmm(images.float().reshape(n, c * height, width), cols.transpose(1, 2))  # (N, C*H, out_w)
    return torch.matmul(rows[:, None], x.view(n, c, height, out_w))  # (N, C, out_h, out_w)



def crop_resize(image: Tensor, boxes: Tensor, size: int, interpolation: str = "bicubic") -> Tensor:
    """Crop one image (C, H, W) to each box ``(y0, x0, h, w)`` and resize to ``size`` x ``size``
    with TensorFlow's half-pixel kernel (the official ``crop_and_resize`` and eval resize);
    returns uint8 (V, 3, S, S), clipped and rounded.

    Image-folder workers use it to cut training crops from the full decoded image, so that the
    batched augmentation only has to flip, jitter and blur.
    """
    if image.dim() != 3:
        raise ValueError(f"expected one image (C, H, W), got shape {tuple(image.shape)}")
    boxes = torch.as_tensor(boxes, dtype=torch.long).view(-1, 4)
    _, height, width = image.shape
    if augment_kernel.available() and image.dtype == torch.uint8 and image.device.type == "cpu":
        taps_y, weights_y = interpolation_taps(boxes[:, 0], boxes[:, 2], height, size, interpolation)
        taps_x, weights_x = interpolation_taps(boxes[:, 1], boxes[:, 3], width, size, interpolation)
        return augment_kernel.resize_crops(image, taps_y, weights_y, taps_x.transpose(1, 2),
                                           weights_x.transpose(1, 2), size)
    views = resize_boxes(as_rgb(image[None]).expand(boxes.shape[0], -1, -1, -1), boxes, size,
                         interpolation=interpolation)
    return views.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)

