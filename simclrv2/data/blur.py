"""Gaussian blur with a sigma per image (official ``random_blur``/``gaussian_blur``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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

