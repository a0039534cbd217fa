"""Crop boxes ``(y0, x0, h, w)``: the official random crop rule and the eval centre crop."""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

CROP_MIN_AREA = 0.08  # official smallest random crop, as a share of the image area (--crop-min-area)
CROP_PROPORTION = 0.875  # official CROP_PROPORTION, used for eval centre crops (ImageNet standard)
FIRST_CROP_ATTEMPTS = 8  # attempts judged for every image; the rest only where these all fail


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    generator: Optional[torch.Generator] = None,
    area_range: tuple[float, float] = (CROP_MIN_AREA, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    min_object_covered: float = 0.1,
    max_attempts: int = 100,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Random crop boxes ``(y0, x0, h, w)`` following ``tf.image.sample_distorted_bounding_box``.

    Official ``data_util.distorted_bounding_box_crop`` with the arguments ``crop_and_resize``
    passes. All attempts are drawn at once; each image keeps its first valid attempt and falls
    back to the whole image when none of ``max_attempts`` is valid. Arithmetic is float32 with
    round-half-to-even like the C++ kernel's ``lrintf``; as there, the offset is drawn from
    ``[0, size - crop - 1]`` (a crop never touches the bottom/right edge unless it spans it).
    On the host only the first ``FIRST_CROP_ATTEMPTS`` are judged for every image, the rest for
    the images these all fail (the same boxes, a fraction of the work).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not 0 < area_range[0] <= area_range[1] <= 1:
        raise ValueError(f"area_range must satisfy 0 < low <= high <= 1, got {area_range}")
    if not 0 < aspect_ratio_range[0] <= aspect_ratio_range[1]:
        raise ValueError(f"aspect_ratio_range must satisfy 0 < low <= high, got {aspect_ratio_range}")
    shape = (max_attempts, n)
    lo, hi = aspect_ratio_range
    aspect = torch.rand(shape, generator=generator, device=device) * (hi - lo) + lo
    u = torch.rand(shape, generator=generator, device=device)
    judge = functools.partial(first_valid_crop, height=height, width=width, area_range=area_range,
                              min_object_covered=min_object_covered)
    lazy = aspect.device.type == "cpu" and max_attempts > FIRST_CROP_ATTEMPTS
    h, w, found = judge(aspect[:FIRST_CROP_ATTEMPTS], u[:FIRST_CROP_ATTEMPTS]) if lazy else judge(aspect, u)
    if lazy and not bool(found.all()):
        rest = (~found).nonzero()[:, 0]
        h[rest], w[rest], found[rest] = judge(aspect[:, rest], u[:, rest])
    h = torch.where(found, h, float(height))
    w = torch.where(found, w, float(width))
    offsets = torch.rand((2, n), generator=generator, device=device)
    y0 = torch.minimum(torch.floor(offsets[0] * (height - h)), (height - h - 1).clamp(min=0))
    x0 = torch.minimum(torch.floor(offsets[1] * (width - w)), (width - w - 1).clamp(min=0))
    return torch.stack([y0, x0, h, w], dim=1).long()


def first_valid_crop(aspect: Tensor, u: Tensor, height: int, width: int, area_range: tuple[float, float],
                     min_object_covered: float) -> tuple[Tensor, Tensor, Tensor]:
    """Height and width (float32) of each column's first valid crop attempt, and whether it had
    one: attempt ``i`` of image ``j`` uses ``aspect[i, j]`` and ``u[i, j]`` (its height draw),
    as in TensorFlow's ``GenerateRandomCrop`` loop."""
    f32 = torch.float32
    image_area = float(width * height)
    min_area = torch.tensor(area_range[0], dtype=f32) * image_area
    max_area = torch.tensor(area_range[1], dtype=f32) * image_area
    h = torch.round(torch.sqrt(min_area / aspect))
    max_h = torch.round(torch.sqrt(max_area / aspect))
    too_wide = torch.round(max_h * aspect) > width
    capped = torch.floor((width + 0.5 - 1e-7) / aspect.double()).to(f32)
    capped = torch.where(torch.round(capped * aspect) > width, capped - 1, capped)
    max_h = torch.where(too_wide, capped, max_h).clamp(max=height)
    h = torch.minimum(h, max_h)
    h = h + torch.minimum(torch.floor(u * (max_h - h + 1)), max_h - h)
    w = torch.round(h * aspect)
    area = w * h
    grow = area < min_area
    h = torch.where(grow, h + 1, h)
    w = torch.where(grow, torch.round(h * aspect), w)
    area = w * h
    shrink = area > max_area
    h = torch.where(shrink, h - 1, h)
    w = torch.where(shrink, torch.round(h * aspect), w)
    area = w * h
    ok = (area >= min_area) & (area <= max_area) & (w <= width) & (h <= height) & (w > 0) & (h > 0)
    ok &= (area >= 1) & (area / image_area >= min_object_covered)  # SatisfiesOverlapConstraints
    first = ok.to(torch.uint8).argmax(dim=0, keepdim=True)
    return h.gather(0, first)[0], w.gather(0, first)[0], ok.any(dim=0)


def center_crop_box(height: int, width: int, out_height: int, out_width: int,
                    crop_proportion: float = CROP_PROPORTION) -> tuple[int, int, int, int]:
    """Aspect-preserving centre crop ``(y0, x0, h, w)`` (official ``data_util.center_crop``)."""
    aspect = out_width / out_height
    if aspect > width / height:
        crop_h = round(crop_proportion / aspect * width)
        crop_w = round(crop_proportion * width)
    else:
        crop_h = round(crop_proportion * height)
        crop_w = round(crop_proportion * aspect * height)
    crop_h, crop_w = max(crop_h, 1), max(crop_w, 1)
    return ((height - crop_h + 1) // 2, (width - crop_w + 1) // 2, crop_h, crop_w)



def same_boxes(n: int, box: Sequence[int], device: torch.device) -> Tensor:
    """``n`` copies of one ``(y0, x0, h, w)`` box, filled on ``device`` (no host-to-GPU copy)."""
    boxes = torch.empty(n, 4, dtype=torch.long, device=device)
    for column, value in enumerate(box):
        boxes[:, column] = value
    return boxes

