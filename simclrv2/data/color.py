"""Colour ops on float batches (N, 3, H, W) with per-image factors (N,), as TensorFlow's
``tf.image.adjust_*`` and the official ``color_jitter_rand`` apply them."""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale
COLOR_OPS = ("brightness", "contrast", "saturation", "hue")  # official order before shuffling


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



_COLOR_FNS_ = {"brightness": _brightness_, "contrast": _contrast_, "saturation": _saturation_,
               "hue": adjust_hue}  # may work in place on their (freshly gathered) input


def color_jitter_(x: Tensor, params: Any, subsets: list[list[Tensor]]) -> Tensor:
    """In place: each image's four ops in its own order, clipping after each. ``subsets[step][op]``
    indexes the images doing ``op`` at ``step`` (``augment.schedule``), ``params`` has a factor
    per op name; ``x`` must be a float32 tensor the caller owns."""
    for step in range(4):
        for op_index, name in enumerate(COLOR_OPS):
            idx = subsets[step][op_index].to(x.device)
            if idx.numel():
                factor = getattr(params, name).to(x.device).index_select(0, idx)
                x.index_copy_(0, idx, _COLOR_FNS_[name](x.index_select(0, idx), factor).clamp_(0.0, 1.0))
    return x

