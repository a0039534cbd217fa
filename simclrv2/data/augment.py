"""Batched SimCLR augmentation on image tensors, with per-image random parameters.

The whole batch is augmented at once on whatever device it lives on, with no Python loop over
images. Semantics follow the official ``tf2/data_util.py`` (``preprocess_for_train``,
``random_color_jitter``, ``color_jitter_rand``, ``batch_random_blur``):

1. random crop: ``distorted_bounding_box_crop`` (TensorFlow's ``sample_distorted_bounding_box``
   rules: integer heights drawn uniformly, width = round(height * aspect), area 0.08-1, aspect
   3/4-4/3, crop must cover >= 10 % of the image, 100 attempts, then the whole image), resized to
   ``image_size`` with TensorFlow's half-pixel-centre bicubic (Keys, a = -0.5) or bilinear
   kernel, taps outside the crop dropped and the weights renormalised, no antialiasing;
2. horizontal flip with p = 0.5;
3. with p = 0.8 colour jitter in a random order per image, clipping to [0, 1] after each op:
   multiplicative brightness U(max(0, 1-0.8s), 1+0.8s) (SimCLRv2), contrast about the
   per-channel mean (``tf.image.adjust_contrast``), saturation by scaling HSV saturation with
   clipping (``tf.image.adjust_saturation``), hue rotation of the HSV hue by U(-0.2s, 0.2s)
   turns (``tf.image.adjust_hue``); then, independently, grayscale with p = 0.2;
4. Gaussian blur with p = 0.5, sigma U(0.1, 2), ``image_size // 10`` rounded up to odd taps,
   zero ("SAME") padding, then a clip to [0, 1].

The crop sampler mirrors the C++ kernel, quirks included (offsets are drawn from
``[0, size - crop - 1]``). The bicubic resize reproduces the official evaluation preprocessing
to 4e-7 on the reference fixtures. Differences from the official code: one blur sigma per
*image* (the official draws one per view batch); contrast/saturation lower bounds are clamped
at 0 for strengths above 1.25 (TensorFlow raises there); ``interpolation="bilinear"`` swaps the
official bicubic kernel for TensorFlow's bilinear one (faster on CPU).

Speed: each op runs once on the whole batch or, for per-image choices (which colour op at
which step, grayscale, blur), on the index subset of images that need it, found with one sort
where the parameters were drawn. The stages draw them on the host, so a batch on a GPU is
augmented without waiting for the GPU: its parameters and index subsets go over in one
non-blocking copy, and the host can queue the views while the GPU still runs the previous
step. The bicubic resize is two batched matrix
products with per-image interpolation matrices, the bilinear one two 1-D ``grid_sample``
passes; HSV hue and saturation are closed-form (no HSV round trip, no ``torch.where``). On
CPU the batch is processed in cache-sized chunks, and uint8 batches go through the fused Numba
kernel of ``augment_kernel.py`` instead (the same function in one compiled pass per image).
"""
from __future__ import annotations

import functools

from dataclasses import dataclass, fields
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from simclrv2.data import augment_kernel

CPU_CHUNK_PIXELS = 1_200_000  # pixels per chunk on CPU (keeps intermediates cache-resident)
CROP_PROPORTION = 0.875  # official CROP_PROPORTION, used for eval centre crops (ImageNet standard)
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale
_OPS = ("brightness", "contrast", "saturation", "hue")


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------
@dataclass
class AugmentParams:
    """Per-image random parameters of one SimCLR view; every field has the batch as first dim.

    ``boxes`` rows are ``(y0, x0, h, w)`` in source pixels. ``order[i]`` is the permutation of
    (brightness, contrast, saturation, hue) used for image ``i``; factors are only used where
    ``jitter`` is true, ``sigma`` only where ``blur`` is true.
    """

    boxes: Tensor  # (N, 4) long
    flip: Tensor  # (N,) bool
    jitter: Tensor  # (N,) bool
    order: Tensor  # (N, 4) long
    brightness: Tensor  # (N,) float, multiplicative factor
    contrast: Tensor  # (N,) float
    saturation: Tensor  # (N,) float
    hue: Tensor  # (N,) float, in turns (1.0 = 360 degrees)
    grayscale: Tensor  # (N,) bool
    blur: Tensor  # (N,) bool
    sigma: Tensor  # (N,) float, in output pixels

    def to(self, device: torch.device | str) -> "AugmentParams":
        return AugmentParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, index: slice) -> "AugmentParams":
        return AugmentParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def __len__(self) -> int:
        return self.boxes.shape[0]


def _uniform(n: int, low: float, high: float, generator: Optional[torch.Generator], device) -> Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


FIRST_CROP_ATTEMPTS = 8  # attempts judged for every image; the rest only where these all fail


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    generator: Optional[torch.Generator] = None,
    area_range: tuple[float, float] = (0.08, 1.0),
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


# ----------------------------------------------------------------------------------------------
# Resampling: per-image separable interpolation matrices
# ----------------------------------------------------------------------------------------------
def _keys_cubic(d: Tensor, a: float = -0.5) -> Tensor:
    d = d.abs()
    d2, d3 = d * d, d * d * d
    near = (a + 2) * d3 - (a + 3) * d2 + 1
    far = a * d3 - 5 * a * d2 + 8 * a * d - 4 * a
    return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def _triangle(d: Tensor) -> Tensor:
    return (1 - d.abs()).clamp(min=0)


_KERNELS: dict[str, tuple[Callable[[Tensor], Tensor], int]] = {"bicubic": (_keys_cubic, 2), "bilinear": (_triangle, 1)}


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


# ----------------------------------------------------------------------------------------------
# Colour ops on float batches (N, 3, H, W) with per-image factors (N,)
# ----------------------------------------------------------------------------------------------
def _per_image(v: Tensor, x: Tensor) -> Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """SimCLRv2 multiplicative brightness (official ``random_brightness``, impl='simclrv2')."""
    return _brightness_(x.clone(), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """``tf.image.adjust_contrast``: scale each channel's deviation from its spatial mean."""
    return _contrast_(x.clone(), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """``tf.image.adjust_saturation``: HSV saturation times ``factor``, clipped to [0, 1].

    With value V = max and chroma C = max - min, hue is kept and the chroma becomes
    min(factor * C, V), i.e. every channel's distance below the max is scaled by
    min(factor, V / C); done in closed form without an HSV round trip.
    """
    return _saturation_(x.clone(), factor)


def _brightness_(x: Tensor, factor: Tensor) -> Tensor:
    return x.mul_(_per_image(factor, x))


def _contrast_(x: Tensor, factor: Tensor) -> Tensor:
    n, c = x.shape[:2]
    mean = x.reshape(n, c, -1).mean(dim=2).view(n, c, 1, 1)
    f = _per_image(factor, x)
    return x.mul_(f).add_(mean * (1 - f))


def _channel_max_min(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return r, g, b, torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)


def _saturation_(x: Tensor, factor: Tensor) -> Tensor:
    _, _, _, vmax, vmin = _channel_max_min(x)
    scale = torch.minimum(vmax / (vmax - vmin).clamp_(min=1e-12), _per_image(factor, x))
    return x.sub_(vmax).mul_(scale).add_(vmax)


def adjust_hue(x: Tensor, delta: Tensor) -> Tensor:
    """``tf.image.adjust_hue``: rotate the HSV hue by ``delta`` turns; value and saturation kept.

    Exact HSV rotation in closed form. The hue h in [0, 6) comes from the max channel (R, then
    G, then B on ties, like TensorFlow's ``rgb_to_hsv``); after the shift each channel is
    ``max - chroma * w_c(h)`` with the HSV-to-RGB weights ``w_R = clip(2 - |h - 3|, 0, 1)``,
    ``w_G = clip(|h - 2| - 1, 0, 1)``, ``w_B = clip(|h - 4| - 1, 0, 1)``. Branches are float
    masks, not ``torch.where``, which is much slower on CPU.
    """
    r, g, b, vmax, vmin = _channel_max_min(x)
    chroma = vmax - vmin
    is_r = (vmax == r).to(x.dtype)
    is_g = (vmax == g).to(x.dtype).mul_(1.0 - is_r)
    is_b = (1.0 - is_r).sub_(is_g)
    hue = (g - b).mul_(is_r).addcmul_(b - r, is_g).addcmul_(r - g, is_b)
    hue.div_(chroma.clamp(min=1e-12)).add_(is_g, alpha=2.0).add_(is_b, alpha=4.0)
    hue.add_(6.0 * _per_image(delta, x)).remainder_(6.0)
    out = torch.empty_like(x)
    for c, centre in enumerate((3.0, 2.0, 4.0)):  # hue at which channel c is at its minimum
        w = (hue - centre).abs_()
        w = (w.neg_().add_(2.0) if c == 0 else w.sub_(1.0)).clamp_(0.0, 1.0)
        torch.addcmul(vmax, chroma, w, value=-1.0, out=out[:, c:c + 1])
    return out


@functools.lru_cache(maxsize=None)
def _gray_weights(device: torch.device, dtype: torch.dtype) -> Tensor:
    """Made once per device: a host-to-GPU copy would wait for the GPU's queued work."""
    return torch.tensor(GRAY_WEIGHTS, dtype=dtype).view(1, 3, 1, 1).to(device)


def to_grayscale(x: Tensor) -> Tensor:
    """``tf.image.rgb_to_grayscale`` tiled to 3 channels (official ``to_grayscale``)."""
    return (x * _gray_weights(x.device, x.dtype)).sum(dim=1, keepdim=True).expand_as(x)


def same_boxes(n: int, box: Sequence[int], device: torch.device) -> Tensor:
    """``n`` copies of one ``(y0, x0, h, w)`` box, filled on ``device`` (no host-to-GPU copy)."""
    boxes = torch.empty(n, 4, dtype=torch.long, device=device)
    for column, value in enumerate(box):
        boxes[:, column] = value
    return boxes


_COLOR_FNS_ = {"brightness": _brightness_, "contrast": _contrast_, "saturation": _saturation_,
               "hue": adjust_hue}  # may work in place on their (freshly gathered) input


def color_jitter(x: Tensor, params: AugmentParams) -> Tensor:
    """Official ``color_jitter_rand``: the 4 ops in each image's own order, clip after each.

    Only images where ``params.jitter`` is true are changed. Each op runs on the index subset of
    images scheduled for it at that step, so each image undergoes exactly its 4 ops; the loop is
    over (step, op) pairs, never over images.
    """
    return _color_jitter_(x.clone(), params, schedule(params)[0])


Plan = tuple[list[list[Tensor]], Tensor, Tensor]


def schedule(params: AugmentParams) -> Plan:
    """Index subsets for the batch: ``jitter[step][op]`` (images doing colour op ``op`` at
    ``step``), ``grayscale`` and ``blur``. Found with one sort and one read of the counts, on
    the parameters' device: free on the host, a wait for the queued work on a GPU."""
    jitter_codes = torch.where(params.jitter[:, None], params.order, len(_OPS))  # 4 = not jittered
    skip = len(_OPS)
    codes = torch.cat([jitter_codes, torch.where(params.grayscale, 0, skip)[:, None],
                       torch.where(params.blur, 0, skip)[:, None]], dim=1)
    order = torch.argsort(codes, dim=0, stable=True)
    counts = torch.stack([torch.bincount(col, minlength=skip + 1) for col in codes.T]).tolist()
    subsets = []
    for k, col_counts in enumerate(counts):
        starts = [sum(col_counts[:j]) for j in range(skip + 1)]
        subsets.append([order[starts[j]:starts[j] + col_counts[j], k] for j in range(skip)])
    return subsets[:4], subsets[4][0], subsets[5][0]


def _send(params: AugmentParams, plan: Optional[Plan], device: torch.device) -> tuple[AugmentParams, Optional[Plan]]:
    """``params`` and ``plan`` on ``device`` in a single host-to-device copy, from pinned memory
    and non-blocking on CUDA, so the host does not wait for the GPU's queued work (a blocking
    copy would, once per tensor). The tensors are packed as bytes, each at an 8-byte offset,
    and come back as views of the one device buffer."""
    plan_tensors = [] if plan is None else [t for step in plan[0] for t in step] + [plan[1], plan[2]]
    tensors = [getattr(params, f.name) for f in fields(params)] + plan_tensors
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + -(-size // 8) * 8)
    packed = torch.empty(offsets[-1], dtype=torch.uint8, pin_memory=device.type == "cuda")
    for t, size, start in zip(tensors, sizes, offsets):
        packed[start:start + size].view(t.dtype).copy_(t.detach().reshape(-1))
    packed = packed.to(device, non_blocking=True)
    moved = [packed[start:start + size].view(t.dtype).view(t.shape) for t, size, start in zip(tensors, sizes, offsets)]
    num_fields = len(fields(params))
    params = AugmentParams(*moved[:num_fields])
    if plan is None:
        return params, None
    jitter = iter(moved[num_fields:-2])
    return params, ([[next(jitter) for _ in step] for step in plan[0]], moved[-2], moved[-1])


def _color_jitter_(x: Tensor, params: AugmentParams, subsets: list[list[Tensor]]) -> Tensor:
    """In-place ``color_jitter`` (``x`` must be a float32 tensor the caller owns)."""
    for step in range(4):
        for op_index, name in enumerate(_OPS):
            idx = subsets[step][op_index].to(x.device)
            if idx.numel():
                factor = getattr(params, name).to(x.device).index_select(0, idx)
                x.index_copy_(0, idx, _COLOR_FNS_[name](x.index_select(0, idx), factor).clamp_(0.0, 1.0))
    return x


# ----------------------------------------------------------------------------------------------
# Blur
# ----------------------------------------------------------------------------------------------
def blur_kernel_radius(image_size: int) -> int:
    """Official ``random_blur``: kernel_size = image_size // 10, radius = int(kernel_size / 2)."""
    return (image_size // 10) // 2


def gaussian_taps(sigma: Tensor, radius: int) -> Tensor:
    """Per-image normalised 1-D Gaussian taps ``(N, 2*radius+1)`` (official ``gaussian_blur``)."""
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    taps = torch.exp(-offsets[None] ** 2 / (2 * sigma.float()[:, None] ** 2))
    return taps / taps.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur of each image with its own sigma; zero ("SAME") padding as the
    official ``gaussian_blur``; not clipped. Depthwise convolutions with one group per image and
    channel, except short kernels on CPU (up to 5 taps, i.e. images under 60 px), which are
    faster as shifted multiply-adds."""
    n, c, height, width = x.shape
    if radius <= 0 or n == 0:
        return x
    taps = gaussian_taps(sigma.to(x.device), radius).to(x.dtype)
    size = 2 * radius + 1
    if x.device.type != "cpu" or radius > 2:
        k = taps.repeat_interleave(c, dim=0)
        y = F.conv2d(x.reshape(1, n * c, height, width), k.view(n * c, 1, 1, size), padding=(0, radius), groups=n * c)
        return F.conv2d(y, k.view(n * c, 1, size, 1), padding=(radius, 0), groups=n * c).view(n, c, height, width)
    weight = [taps[:, t].view(n, 1, 1, 1) for t in range(size)]
    padded = F.pad(x, (radius, radius))
    rows = padded[..., 0:width] * weight[0]
    for t in range(1, size):
        rows.addcmul_(padded[..., t:t + width], weight[t])
    padded = F.pad(rows, (0, 0, radius, radius))
    out = padded[:, :, 0:height] * weight[0]
    for t in range(1, size):
        out.addcmul_(padded[:, :, t:t + height], weight[t])
    return out


# ----------------------------------------------------------------------------------------------
# The augmentation
# ----------------------------------------------------------------------------------------------
def _float32_math(method):
    """Keep image arithmetic in float32 under a caller's autocast: the training step runs inside
    autocast, where fp16 would overflow the resize and colour ops and bf16 would blur colours."""
    @functools.wraps(method)
    def wrapper(self, images: Tensor, *args, **kwargs):
        with torch.autocast(device_type=images.device.type, enabled=False):
            return method(self, images, *args, **kwargs)
    return wrapper


class SimCLRAugment:
    """One random SimCLR view of every image in a batch (official ``preprocess_for_train`` +
    ``batch_random_blur``), with independent parameters per image.

    ``__call__(images, generator)`` takes (N, C, H, W) uint8 or float in [0, 1] (C = 1 or 3) on
    any device and returns float32 (N, 3, S, S) in [0, 1] on that device. Random parameters are
    drawn from ``generator`` (on its device; the default CPU generator when None), so the same
    seed gives the same views. A CPU generator suits every device: the same seed then gives the
    same parameters on CPU and GPU (the views agree up to float rounding), and a GPU batch is
    augmented without waiting for the GPU.
    :meth:`views` makes several views of each image in one call.

    ``color_jitter_strength`` is s; ``use_blur`` should be False at 32 px or less (official
    CIFAR setting). ``interpolation`` is ``"bicubic"`` (official) or ``"bilinear"`` (faster on
    CPU). ``crop=False, color=False, use_blur=False`` gives flip only; the fine-tuning
    augmentation is ``finetune_augment``.
    """

    def __init__(self, image_size: int, color_jitter_strength: float = 1.0, use_blur: bool = True,
                 crop: bool = True, flip: bool = True, color: bool = True, grayscale_p: float = 0.2,
                 color_p: float = 0.8, blur_p: float = 0.5, interpolation: str = "bicubic",
                 area_range: tuple[float, float] = (0.08, 1.0),
                 aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3), chunk_size: Optional[int] = None,
                 fused: Optional[bool] = None):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if color_jitter_strength < 0:
            raise ValueError(f"color_jitter_strength must be >= 0, got {color_jitter_strength}")
        for name, p in (("grayscale_p", grayscale_p), ("color_p", color_p), ("blur_p", blur_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if interpolation not in _KERNELS:
            raise ValueError(f"interpolation must be one of {sorted(_KERNELS)}, got {interpolation!r}")
        self.image_size = image_size
        self.strength = color_jitter_strength
        self.use_blur = use_blur
        self.crop, self.flip, self.color = crop, flip, color  # colour stage: jitter (if s > 0), then grayscale
        self.grayscale_p, self.color_p, self.blur_p = grayscale_p, color_p, blur_p
        self.interpolation = interpolation
        self.area_range, self.aspect_ratio_range = area_range, aspect_ratio_range
        self.blur_radius = blur_kernel_radius(image_size)
        self.chunk_size = chunk_size
        if fused and not augment_kernel.available():
            raise ValueError("fused=True needs Numba (pip install numba); use fused=None to fall back")
        self.fused = augment_kernel.available() if fused is None else fused

    def __repr__(self) -> str:
        return (f"SimCLRAugment(image_size={self.image_size}, s={self.strength}, crop={self.crop}, "
                f"flip={self.flip}, color={self.color}, blur={self.use_blur}, interpolation={self.interpolation})")

    def sample_params(self, n: int, height: int, width: int,
                      generator: Optional[torch.Generator] = None) -> AugmentParams:
        """Draw the per-image parameters for ``n`` images of size ``height`` x ``width``."""
        device = generator.device if generator is not None else torch.device("cpu")
        g = generator
        if self.crop:  # square output: the official aspect range times width/height = 1
            boxes = sample_crop_boxes(n, height, width, g, self.area_range, self.aspect_ratio_range, device=device)
        else:
            boxes = same_boxes(n, (0, 0, height, width), device)
        u = torch.rand(n, 4, generator=g, device=device)
        s = self.strength
        b, c, sat, hue = 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s
        return AugmentParams(
            boxes=boxes,
            flip=(u[:, 0] < 0.5) if self.flip else torch.zeros(n, dtype=torch.bool, device=device),
            jitter=((u[:, 1] < self.color_p) if self.color and s > 0
                    else torch.zeros(n, dtype=torch.bool, device=device)),
            order=torch.rand(n, 4, generator=g, device=device).argsort(dim=1),
            brightness=_uniform(n, max(1.0 - b, 0.0), 1.0 + b, g, device),
            contrast=_uniform(n, max(1.0 - c, 0.0), 1.0 + c, g, device),
            saturation=_uniform(n, max(1.0 - sat, 0.0), 1.0 + sat, g, device),
            hue=_uniform(n, -hue, hue, g, device),
            grayscale=(u[:, 2] < self.grayscale_p) if self.color else torch.zeros(n, dtype=torch.bool, device=device),
            blur=(u[:, 3] < self.blur_p) if self.use_blur else torch.zeros(n, dtype=torch.bool, device=device),
            sigma=_uniform(n, 0.1, 2.0, g, device),
        )

    @_float32_math
    def apply(self, images: Tensor, params: AugmentParams) -> Tensor:
        """Apply given parameters to (N, C, H, W) images; returns float32 (N, 3, S, S) in [0, 1].

        uint8 batches on CPU use the fused kernel when ``self.fused``; otherwise the batch is
        processed in chunks (``chunk_size`` images, default about 1.2 M pixels on CPU) so that
        intermediates stay in cache. Neither changes the result beyond float rounding.
        """
        _check_batch(images)
        if len(params) != images.shape[0]:
            raise ValueError(f"got parameters for {len(params)} images but a batch of {images.shape[0]}")
        if self.fused and images.device.type == "cpu" and images.dtype == torch.uint8:
            return self._apply_fused(images, params.to(images.device))
        images = _as_rgb(images)
        n = images.shape[0]
        pixels = max(images.shape[2] * images.shape[3], self.image_size**2)
        chunk = self.chunk_size or (max(1, CPU_CHUNK_PIXELS // pixels) if images.device.type == "cpu" else n)
        if n <= chunk:
            return self._apply(images, params)
        out = torch.empty(n, 3, self.image_size, self.image_size, device=images.device)
        for start in range(0, n, chunk):
            out[start:start + chunk] = self._apply(images[start:start + chunk], params[start:start + chunk])
        return out

    def _apply(self, images: Tensor, params: AugmentParams) -> Tensor:
        colour_or_blur = self.color or (self.use_blur and self.blur_radius > 0)
        plan = schedule(params) if colour_or_blur else None
        if params.boxes.device != images.device:
            params, plan = _send(params, plan, images.device)
        x = resize_boxes(images, params.boxes, self.image_size, params.flip, self.interpolation)
        if plan is None:  # crop and flip only (fine-tuning)
            return x.clamp_(0.0, 1.0)
        jitter, gray, blur = plan
        if self.color:
            x = _color_jitter_(x, params, jitter)
            if gray.numel():
                x.index_copy_(0, gray, to_grayscale(x.index_select(0, gray)))
        x = x.clamp_(0.0, 1.0)
        if self.use_blur and self.blur_radius > 0 and blur.numel():
            blurred = gaussian_blur(x.index_select(0, blur), params.sigma.index_select(0, blur), self.blur_radius)
            x.index_copy_(0, blur, blurred.clamp_(0.0, 1.0))
        return x

    def _apply_fused(self, images: Tensor, params: AugmentParams) -> Tensor:
        _, _, height, width = images.shape
        size = self.image_size
        taps_y, weights_y = interpolation_taps(params.boxes[:, 0], params.boxes[:, 2], height, size, self.interpolation)
        taps_x, weights_x = interpolation_taps(params.boxes[:, 1], params.boxes[:, 3], width, size, self.interpolation)
        flip = params.flip[:, None, None]
        taps_x, weights_x = torch.where(flip, taps_x.flip(1), taps_x), torch.where(flip, weights_x.flip(1), weights_x)
        jitter = params.jitter & self.color
        order = torch.where(jitter[:, None], params.order, augment_kernel.NO_OP)
        factors = torch.stack([params.brightness, params.contrast, params.saturation, params.hue], dim=1)
        blur = params.blur & (self.use_blur and self.blur_radius > 0)
        blur_taps = gaussian_taps(params.sigma, self.blur_radius)
        return augment_kernel.augment_views(
            images, taps_y, weights_y, taps_x.transpose(1, 2), weights_x.transpose(1, 2), order, factors,
            params.grayscale & self.color, blur, blur_taps, size)

    def __call__(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        _check_batch(images)
        n, _, height, width = images.shape
        return self.apply(images, self.sample_params(n, height, width, generator))

    def views(self, images: Tensor, num_views: int = 2, generator: Optional[torch.Generator] = None) -> Tensor:
        """``num_views`` independent views of the (N, C, H, W) batch (the paper uses 2), stacked:
        view ``v`` of image ``i`` is row ``v * N + i``. Made in one call, so the fixed cost of
        a call (hundreds of small ops) is paid once."""
        return self(images.repeat(num_views, 1, 1, 1), generator)


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
    views = resize_boxes(_as_rgb(image[None]).expand(boxes.shape[0], -1, -1, -1), boxes, size,
                         interpolation=interpolation)
    return views.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)


def finetune_augment(image_size: int, interpolation: str = "bicubic", crop: bool = True) -> SimCLRAugment:
    """Random resized crop + flip, no colour or blur: the official fine-tuning/distillation
    augmentation (``preprocess_for_train`` with ``color_distort=False``). ``crop=False`` for
    batches whose crops were already cut (image-folder workers): flip only."""
    return SimCLRAugment(image_size, color_jitter_strength=0.0, use_blur=False, color=False, crop=crop,
                         interpolation=interpolation)


class EvalTransform:
    """Deterministic evaluation preprocessing (official ``preprocess_for_eval``).

    For ``image_size > 32``: aspect-preserving centre crop of 0.875 then resize. For 32 px or
    less: no crop (official ``test_crop=False``); images are only resized when their size
    differs from ``image_size``. Returns float32 (N, 3, S, S) in [0, 1].
    """

    def __init__(self, image_size: int, crop: Optional[bool] = None, crop_proportion: float = CROP_PROPORTION,
                 interpolation: str = "bicubic"):
        self.image_size = image_size
        self.crop = image_size > 32 if crop is None else crop
        self.crop_proportion = crop_proportion
        self.interpolation = interpolation

    @_float32_math
    def __call__(self, images: Tensor) -> Tensor:
        _check_batch(images)
        images = _as_rgb(images)
        n, _, height, width = images.shape
        size = self.image_size
        if not self.crop and (height, width) == (size, size):
            x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
            return x.clamp(0.0, 1.0)
        box = center_crop_box(height, width, size, size, self.crop_proportion) if self.crop else (0, 0, height, width)
        return resize_boxes(images, same_boxes(n, box, images.device), size,
                            interpolation=self.interpolation).clamp_(0.0, 1.0)


def _check_batch(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected an image batch of shape (N, 1 or 3, H, W), got {shape}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")


def _as_rgb(images: Tensor) -> Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


# ----------------------------------------------------------------------------------------------
# Classic per-image torchvision pipeline (reference / --augmentation torchvision)
# ----------------------------------------------------------------------------------------------
def torchvision_simclr_transform(image_size: int, s: float = 1.0, blur: Optional[bool] = None,
                                 color: bool = True, interpolation: str = "bilinear"):
    """The usual per-image PIL SimCLR pipeline from torchvision, returning a float tensor.

    RandomResizedCrop(0.08-1, 3/4-4/3), flip, RandomApply(ColorJitter(0.8s, 0.8s, 0.8s, 0.2s),
    p=0.8), RandomGrayscale(0.2), RandomApply(GaussianBlur, p=0.5) with the official kernel size,
    ToTensor. ``blur`` defaults to the official rule (on above 32 px); ``interpolation`` is the
    crop resize (torchvision's default bilinear; the official code uses bicubic). Note
    torchvision's brightness/contrast/saturation differ in detail from TensorFlow's.
    """
    import torchvision.transforms as T

    blur = image_size > 32 if blur is None else blur
    ops = [T.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                               interpolation=T.InterpolationMode(interpolation)),
           T.RandomHorizontalFlip()]
    if color and s > 0:
        ops.append(T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.2 * s, 0.5))], p=0.8))
    if color:
        ops.append(T.RandomGrayscale(p=0.2))
    radius = blur_kernel_radius(image_size)
    if blur and radius > 0:
        ops.append(T.RandomApply([T.GaussianBlur(2 * radius + 1, sigma=(0.1, 2.0))], p=0.5))
    ops.append(T.ToTensor())
    return T.Compose(ops)


class PILViewsDataset(torch.utils.data.Dataset):
    """Wraps a dataset of uint8 (C, H, W) images, returning ``(views, label)`` where ``views`` is
    float (num_views, 3, S, S) made by a per-image PIL ``transform``: the classic pipeline."""

    def __init__(self, dataset, transform, num_views: int = 2):
        self.dataset, self.transform, self.num_views = dataset, transform, num_views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from PIL import Image

        sample = self.dataset[index]
        image, label = sample[0], sample[1]
        image = image.expand(3, -1, -1) if image.shape[0] == 1 else image
        pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
        views = torch.stack([self.transform(pil) for _ in range(self.num_views)])
        return views, (-1 if label is None else label)


__all__: Sequence[str] = (
    "AugmentParams", "SimCLRAugment", "EvalTransform", "crop_resize", "finetune_augment",
    "torchvision_simclr_transform", "PILViewsDataset", "sample_crop_boxes", "center_crop_box",
    "interpolation_matrix", "resize_boxes", "adjust_brightness", "adjust_contrast", "adjust_saturation",
    "adjust_hue", "to_grayscale", "color_jitter", "gaussian_blur", "gaussian_taps", "blur_kernel_radius",
    "CROP_PROPORTION",
)
