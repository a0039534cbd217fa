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

from dataclasses import dataclass, fields
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from simclrv2.data import augment_kernel
from simclrv2.data.blur import blur_kernel_radius, gaussian_blur, gaussian_taps
from simclrv2.data.color import COLOR_OPS, color_jitter_, to_grayscale
from simclrv2.data.crops import CROP_MIN_AREA, same_boxes, sample_crop_boxes
from simclrv2.data.image_batch import as_rgb, check_batch, float32_math
from simclrv2.data.resize import INTERPOLATIONS, interpolation_taps, resize_boxes

CPU_CHUNK_PIXELS = 1_200_000  # pixels per chunk on CPU (keeps intermediates cache-resident)
ViewMaker = Callable[[Any, torch.Generator], Tensor]  # (batch, generator) -> views (2B, 3, S, S)


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


def color_jitter(x: Tensor, params: AugmentParams) -> Tensor:
    """Official ``color_jitter_rand``: the 4 ops in each image's own order, clip after each.

    Only images where ``params.jitter`` is true are changed. Each op runs on the index subset of
    images scheduled for it at that step, so each image undergoes exactly its 4 ops; the loop is
    over (step, op) pairs, never over images.
    """
    return color_jitter_(x.clone(), params, schedule(params)[0])


Plan = tuple[list[list[Tensor]], Tensor, Tensor]


def schedule(params: AugmentParams) -> Plan:
    """Index subsets for the batch: ``jitter[step][op]`` (images doing colour op ``op`` at
    ``step``), ``grayscale`` and ``blur``. Found with one sort and one read of the counts, on
    the parameters' device: free on the host, a wait for the queued work on a GPU."""
    jitter_codes = torch.where(params.jitter[:, None], params.order, len(COLOR_OPS))  # 4 = not jittered
    skip = len(COLOR_OPS)
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
                 area_range: tuple[float, float] = (CROP_MIN_AREA, 1.0),
                 aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3), chunk_size: Optional[int] = None,
                 fused: Optional[bool] = None):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if color_jitter_strength < 0:
            raise ValueError(f"color_jitter_strength must be >= 0, got {color_jitter_strength}")
        for name, p in (("grayscale_p", grayscale_p), ("color_p", color_p), ("blur_p", blur_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {interpolation!r}")
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

    @float32_math
    def apply(self, images: Tensor, params: AugmentParams) -> Tensor:
        """Apply given parameters to (N, C, H, W) images; returns float32 (N, 3, S, S) in [0, 1].

        uint8 batches on CPU use the fused kernel when ``self.fused``; otherwise the batch is
        processed in chunks (``chunk_size`` images, default about 1.2 M pixels on CPU) so that
        intermediates stay in cache. Neither changes the result beyond float rounding.
        """
        check_batch(images)
        if len(params) != images.shape[0]:
            raise ValueError(f"got parameters for {len(params)} images but a batch of {images.shape[0]}")
        if self.fused and images.device.type == "cpu" and images.dtype == torch.uint8:
            return self._apply_fused(images, params.to(images.device))
        images = as_rgb(images)
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
            x = color_jitter_(x, params, jitter)
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
        check_batch(images)
        n, _, height, width = images.shape
        return self.apply(images, self.sample_params(n, height, width, generator))

    def views(self, images: Tensor, num_views: int = 2, generator: Optional[torch.Generator] = None) -> Tensor:
        """``num_views`` independent views of the (N, C, H, W) batch (the paper uses 2), stacked:
        view ``v`` of image ``i`` is row ``v * N + i``. Made in one call, so the fixed cost of
        a call (hundreds of small ops) is paid once."""
        return self(images.repeat(num_views, 1, 1, 1), generator)



def finetune_augment(image_size: int, interpolation: str = "bicubic", crop: bool = True,
                     crop_min_area: float = CROP_MIN_AREA) -> SimCLRAugment:
    """Random resized crop + flip, no colour or blur: the official fine-tuning/distillation
    augmentation (``preprocess_for_train`` with ``color_distort=False``). ``crop=False`` for
    batches whose crops were already cut (image-folder workers): flip only."""
    return SimCLRAugment(image_size, color_jitter_strength=0.0, use_blur=False, color=False, crop=crop,
                         interpolation=interpolation, area_range=(crop_min_area, 1.0))


def first_then_second(pairs: Tensor) -> Tensor:
    """(B, 2, ...) per-image pairs as (2B, ...): every image's first, then every image's second,
    the row layout of :meth:`SimCLRAugment.views`."""
    return pairs.transpose(0, 1).flatten(0, 1)
