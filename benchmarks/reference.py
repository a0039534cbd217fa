"""The reference: SimCLR as usually written in PyTorch, from widely used parts only.

Views: the standard torchvision transform drawn twice per image (SimCLR appendix A:
RandomResizedCrop(0.08-1), flip, RandomApply(ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), p=0.8),
RandomGrayscale(0.2), Gaussian blur with p = 0.5 above 32 px, ToTensor) on PIL images, from
HWC arrays as ``torchvision.datasets.CIFAR10`` keeps them or JPEGs through ``ImageFolder``, in
DataLoader workers. Loss: the plain NT-Xent. Step: float32, NCHW, SGD with momentum. It imports
nothing from ``simclrv2``; the model is passed in, so both sides train the same network.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image


def two_views(size: int, s: float = 1.0):
    """Two independent draws of the per-image SimCLR transform."""
    ops = [T.RandomResizedCrop(size, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
           T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8), T.RandomGrayscale(p=0.2)]
    kernel = (size // 10) // 2 * 2 + 1  # ~10 % of the image, odd
    if size > 32:
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    transform = T.Compose([*ops, T.ToTensor()])
    return lambda image: (transform(image), transform(image))


class PILImages(torch.utils.data.Dataset):
    """``(transform(PIL image), 0)`` from an (N, H, W, 3) uint8 array, as torchvision's CIFAR10."""

    def __init__(self, images_hwc: np.ndarray, transform):
        self.images, self.transform = images_hwc, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), 0


def to_hwc_rgb(images_nchw: np.ndarray) -> np.ndarray:
    """(N, C, H, W) uint8 with C in (1, 3) -> contiguous (N, H, W, 3)."""
    if images_nchw.shape[1] == 1:
        images_nchw = np.repeat(images_nchw, 3, axis=1)
    return np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))


def make_loader(images_hwc: np.ndarray | str, size: int, batch_size: int, workers: int, s: float = 1.0):
    """A shuffled two-view DataLoader (persistent workers) over an array, or a JPEG folder's path."""
    from torchvision.datasets import ImageFolder

    transform = two_views(size, s)
    dataset = ImageFolder(images_hwc, transform) if isinstance(images_hwc, str) else PILImages(images_hwc, transform)
    extra = dict(persistent_workers=True, prefetch_factor=2) if workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       generator=torch.Generator().manual_seed(0), **extra)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Plain NT-Xent over 2B projections (rows [0, B) view 1, [B, 2B) view 2), mean over 2B."""
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    return F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, views, temperature: float,
               device: torch.device) -> torch.Tensor:
    """One float32 step: both views as one batch, NT-Xent, backward, SGD."""
    loss = nt_xent(model(torch.cat(views).to(device, non_blocking=True))[0], temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
