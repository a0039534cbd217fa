"""Fused CPU kernel for :class:`~simclrv2.data.augment.SimCLRAugment` (Numba).

On the CPU the tensor implementation (``augment.py`` and its ops) makes one pass over memory per
elementary op (about 60 per view) and loses most of its time to memory traffic and per-op
overhead. This kernel does a whole view of one image in a single compiled function, while the
image stays in the L1/L2 cache, with images spread over the cores: separable crop-and-resize
(the same taps as ``resize.interpolation_taps``), flip, the colour ops in each image's order
with a clip after each, grayscale, the final clip and the Gaussian blur. It computes the same
function as the tensor path (``tests/test_augment_kernel.py`` checks it to 1e-5); only the
rounding differs, since it fuses multiply-adds and sums in a different order.

Every inner loop runs over a contiguous 1-D row from index 0, the shape LLVM vectorises. The
kernel is compiled on first use (about 10 s, cached on disk afterwards); batches are split over
``torch.get_num_threads()`` Python threads (no second OpenMP runtime next to PyTorch's, safe
after ``fork``). Without Numba, ``available()`` is False and the tensor path is used.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch
from torch import Tensor

try:
    import numba
    from numba import njit
except ImportError:  # pragma: no cover - exercised only where Numba is missing
    numba = None

_OPTS = {"cache": True, "fastmath": True, "nogil": True}
_ZERO, _ONE, _TWO, _THREE, _FOUR, _SIX = (np.float32(v) for v in (0, 1, 2, 3, 4, 6))
_TINY = np.float32(1e-12)
_GRAY = tuple(np.float32(w) for w in (0.2989, 0.5870, 0.1140))  # tf.image.rgb_to_grayscale
NO_OP = 4  # colour-op code for "this step does nothing" (image not jittered)
_POOL: dict[str, object] = {"pid": None, "pool": None}


def available() -> bool:
    """Whether the fused kernel can run here (Numba is installed)."""
    return numba is not None


if numba is not None:

    @njit(**_OPTS)
    def _clip_(v):
        for p in range(v.shape[0]):
            v[p] = min(max(v[p], _ZERO), _ONE)

    @njit(**_OPTS)
    def _axpy_(out, x, w):
        for p in range(out.shape[0]):
            out[p] += w * x[p]

    @njit(**_OPTS)
    def _resize_plane(src, taps_y, weights_y, taps_x, weights_x, row, tmp, out):
        """Separable resize of one uint8 plane: rows first (a gather along each needed source
        row, taps ``(K, S)``), then columns (weighted sums of whole rows, taps ``(S, K)``)."""
        size, k = weights_y.shape
        first, last = src.shape[0], -1
        for a in range(size):
            for t in range(k):
                if weights_y[a, t] != _ZERO:
                    first = min(first, taps_y[a, t])
                    last = max(last, taps_y[a, t])
        scale = np.float32(1.0 / 255.0)
        for y in range(first, last + 1):
            line = src[y]
            for x in range(line.shape[0]):
                row[x] = np.float32(line[x]) * scale
            acc = tmp[y]
            acc[:] = _ZERO
            for t in range(taps_x.shape[0]):
                idx, w = taps_x[t], weights_x[t]
                for b in range(size):
                    acc[b] += w[b] * row[idx[b]]
        for a in range(size):
            acc = out[a]
            acc[:] = _ZERO
            for t in range(k):
                w = weights_y[a, t]
                if w != _ZERO:
                    _axpy_(acc, tmp[taps_y[a, t]], w)

    @njit(**_OPTS)
    def _brightness(r, g, b, f):
        for v in (r, g, b):
            for p in range(v.shape[0]):
                v[p] = min(max(v[p] * f, _ZERO), _ONE)

    @njit(**_OPTS)
    def _contrast(r, g, b, f):
        for v in (r, g, b):
            total = _ZERO
            for p in range(v.shape[0]):
                total += v[p]
            mean = total / np.float32(v.shape[0])
            for p in range(v.shape[0]):
                v[p] = min(max((v[p] - mean) * f + mean, _ZERO), _ONE)

    @njit(**_OPTS)
    def _saturation(r, g, b, f):
        for p in range(r.shape[0]):
            vmax = max(r[p], g[p], b[p])
            vmin = min(r[p], g[p], b[p])
            s = min(vmax / max(vmax - vmin, _TINY), f)
            r[p] = min(max((r[p] - vmax) * s + vmax, _ZERO), _ONE)
            g[p] = min(max((g[p] - vmax) * s + vmax, _ZERO), _ONE)
            b[p] = min(max((b[p] - vmax) * s + vmax, _ZERO), _ONE)

    @njit(**_OPTS)
    def _hue(r, g, b, delta):
        """HSV hue rotation in closed form, as ``color.adjust_hue``."""
        shift = _SIX * delta
        for p in range(r.shape[0]):
            vr, vg, vb = r[p], g[p], b[p]
            vmax = max(vr, vg, vb)
            chroma = vmax - min(vr, vg, vb)
            inv = _ONE / max(chroma, _TINY)
            if vmax == vr:
                h = (vg - vb) * inv
            elif vmax == vg:
                h = (vb - vr) * inv + _TWO
            else:
                h = (vr - vg) * inv + _FOUR
            h += shift
            h = h + _SIX if h < _ZERO else (h - _SIX if h >= _SIX else h)
            r[p] = min(max(vmax - chroma * min(max(_TWO - abs(h - _THREE), _ZERO), _ONE), _ZERO), _ONE)
            g[p] = min(max(vmax - chroma * min(max(abs(h - _TWO) - _ONE, _ZERO), _ONE), _ZERO), _ONE)
            b[p] = min(max(vmax - chroma * min(max(abs(h - _FOUR) - _ONE, _ZERO), _ONE), _ZERO), _ONE)

    @njit(**_OPTS)
    def _grayscale(r, g, b):
        for p in range(r.shape[0]):
            v = _GRAY[0] * r[p] + _GRAY[1] * g[p] + _GRAY[2] * b[p]
            r[p] = v
            g[p] = v
            b[p] = v

    @njit(**_OPTS)
    def _blur_plane(x, taps, tmp):
        """Separable Gaussian blur of one (S, S) plane, zero padding, then a clip."""
        size = x.shape[0]
        radius = taps.shape[0] // 2
        for a in range(size):
            line, acc = x[a], tmp[a]
            acc[:] = _ZERO
            for t in range(-radius, radius + 1):
                lo, hi = max(0, -t), min(size, size - t)
                _axpy_(acc[lo:hi], line[lo + t:hi + t], taps[t + radius])
        for a in range(size):
            acc = x[a]
            acc[:] = _ZERO
            for t in range(max(-radius, -a), min(radius, size - 1 - a) + 1):
                _axpy_(acc, tmp[a + t], taps[t + radius])
            _clip_(acc)

    @njit(**_OPTS)
    def _augment_one(src, taps_y, weights_y, taps_x, weights_x, order, factors, gray, blur, blur_taps,
                     out, row, tmp):
        for c in range(3):
            _resize_plane(src[c if src.shape[0] == 3 else 0], taps_y, weights_y, taps_x, weights_x, row, tmp, out[c])
        n = out.shape[1] * out.shape[2]
        planes = out.reshape(3, n)
        r, g, b = planes[0], planes[1], planes[2]
        for step in range(order.shape[0]):
            op = order[step]
            if op == 0:
                _brightness(r, g, b, factors[0])
            elif op == 1:
                _contrast(r, g, b, factors[1])
            elif op == 2:
                _saturation(r, g, b, factors[2])
            elif op == 3:
                _hue(r, g, b, factors[3])
        if gray:
            _grayscale(r, g, b)
        for c in range(3):
            _clip_(planes[c])
        if blur:
            for c in range(3):
                _blur_plane(out[c], blur_taps, tmp)

    @njit(**_OPTS)
    def _resize_crops(src, taps_y, weights_y, taps_x, weights_x, out):
        size = out.shape[2]
        row = np.empty(src.shape[2], dtype=np.float32)
        tmp = np.empty((max(src.shape[1], size), size), dtype=np.float32)
        plane = np.empty((size, size), dtype=np.float32)
        for i in range(out.shape[0]):
            for c in range(3):
                _resize_plane(src[c if src.shape[0] == 3 else 0], taps_y[i], weights_y[i], taps_x[i], weights_x[i],
                              row, tmp, plane)
                for a in range(size):
                    for b in range(size):
                        out[i, c, a, b] = np.uint8(np.round(min(max(plane[a, b], _ZERO), _ONE) * np.float32(255.0)))

    @njit(**_OPTS)
    def _augment_batch(images, taps_y, weights_y, taps_x, weights_x, order, factors, gray, blur, blur_taps, out):
        size = out.shape[2]
        row = np.empty(images.shape[3], dtype=np.float32)
        tmp = np.empty((max(images.shape[2], size), size), dtype=np.float32)
        for i in range(images.shape[0]):
            _augment_one(images[i], taps_y[i], weights_y[i], taps_x[i], weights_x[i], order[i], factors[i],
                         gray[i], blur[i], blur_taps[i], out[i], row, tmp)


def resize_crops(image: Tensor, taps_y: Tensor, weights_y: Tensor, taps_x: Tensor, weights_x: Tensor,
                 image_size: int) -> Tensor:
    """Crops of one uint8 image (1 or 3, H, W), each resized by its taps (as in
    :func:`augment_views`, no flip or colour): uint8 (N, 3, S, S), clipped and rounded."""
    if numba is None:
        raise RuntimeError("the fused augmentation kernel needs Numba: pip install numba")
    out = torch.empty(taps_y.shape[0], 3, image_size, image_size, dtype=torch.uint8)
    _resize_crops(_array(image, np.uint8), _array(taps_y, np.int32), _array(weights_y, np.float32),
                  _array(taps_x, np.int32), _array(weights_x, np.float32), out.numpy())
    return out


def _array(t: Tensor, dtype) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)


def augment_views(images: Tensor, taps_y: Tensor, weights_y: Tensor, taps_x: Tensor, weights_x: Tensor,
                  order: Tensor, factors: Tensor, grayscale: Tensor, blur: Tensor, blur_taps: Tensor,
                  image_size: int) -> Tensor:
    """One view of each uint8 image (N, 1 or 3, H, W) on the CPU; returns float32 (N, 3, S, S).

    ``taps_y``/``weights_y`` (N, S, K) and ``taps_x``/``weights_x`` (N, K, S) are the resize taps
    (flip already folded into the column taps), ``order`` (N, 4) the colour op at each step
    (0 brightness, 1 contrast, 2 saturation, 3 hue, ``NO_OP``), ``factors`` (N, 4) the op
    factors in that op order, ``blur_taps`` (N, 2R+1) used where ``blur``.
    """
    if numba is None:
        raise RuntimeError("the fused augmentation kernel needs Numba: pip install numba")
    n = images.shape[0]
    out = torch.empty(n, 3, image_size, image_size)

    inputs = (_array(images, np.uint8), _array(taps_y, np.int32), _array(weights_y, np.float32),
              _array(taps_x, np.int32), _array(weights_x, np.float32), _array(order, np.int32),
              _array(factors, np.float32), _array(grayscale, np.bool_), _array(blur, np.bool_),
              _array(blur_taps, np.float32), out.numpy())
    threads = min(torch.get_num_threads(), n)
    if threads <= 1:
        _augment_batch(*inputs)
        return out
    # Several slices per thread even out the work (blurred images cost more than the others).
    bounds = np.linspace(0, n, min(4 * threads, n) + 1).astype(int)
    slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    list(_pool(threads).map(lambda part: _augment_batch(*(a[part] for a in inputs)), slices))
    return out


def _pool(threads: int) -> ThreadPoolExecutor:
    """A thread pool for this process (the kernel releases the GIL); rebuilt after a fork or when
    the thread count changes."""
    pool: Optional[ThreadPoolExecutor] = _POOL["pool"]  # type: ignore[assignment]
    if _POOL["pid"] != os.getpid() or pool is None or pool._max_workers != threads:
        pool = ThreadPoolExecutor(threads, thread_name_prefix="simclrv2-augment")
        _POOL.update(pid=os.getpid(), pool=pool)
    return pool
