"""The reference: the usual PyTorch SimCLR setup, built only from widely used parts.

* Data: a map-style dataset holding HWC uint8 arrays that returns a PIL image per item (as
  ``torchvision.datasets.CIFAR10`` does), or ``torchvision.datasets.ImageFolder`` over JPEG
  files, two independent draws of the standard torchvision
  SimCLR transform (RandomResizedCrop(0.08-1) -> flip -> RandomApply(ColorJitter(0.8s, 0.8s,
  0.8s, 0.2s), p=0.8) -> RandomGrayscale(0.2) -> [RandomApply(GaussianBlur, p=0.5) above 32 px]
  -> ToTensor), collated by a ``DataLoader`` with worker processes.
* Loss: the plain NT-Xent of most PyTorch SimCLR repositories (normalise, 2B x 2B cosine
  similarities / T, self-similarity masked, cross-entropy to the other view).
* Step: float32, contiguous (NCHW) tensors, ``torch.optim.SGD`` with momentum.

It deliberately imports nothing from ``simclrv2``; the model is passed in, so both sides train
the same network.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image


def simclr_transform(size: int, s: float = 1.0, blur: bool | None = None) -> Callable:
    """The standard per-image SimCLR transform (SimCLR paper appendix A, torchvision ops).
    Blur (kernel ~10 % of the image, sigma 0.1-2) only above 32 px, as the paper's CIFAR runs."""
    blur = size > 32 if blur is None else blur
    ops = [
        T.RandomResizedCrop(size, scale=(0.08, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    kernel = (size // 10) // 2 * 2 + 1
    if blur and kernel > 1:
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    ops.append(T.ToTensor())
    return T.Compose(ops)


class TwoViews:
    """Two independent draws of ``transform`` (the usual ``ContrastiveTransformations``)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)


class PILImageDataset(torch.utils.data.Dataset):
    """``(transform(PIL image), 0)`` from an (N, H, W, 3) uint8 array, like torchvision's
    CIFAR10 dataset (which keeps a numpy array and calls ``Image.fromarray`` per item)."""

    def __init__(self, images_hwc: np.ndarray, transform: Callable):
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


def make_loader(images_hwc: np.ndarray, size: int, batch_size: int, workers: int, s: float = 1.0,
                seed: int = 0) -> torch.utils.data.DataLoader:
    """Shuffled two-view DataLoader over the images (persistent workers, prefetch 2)."""
    dataset = PILImageDataset(images_hwc, TwoViews(simclr_transform(size, s)))
    extra = dict(persistent_workers=True, prefetch_factor=2) if workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       generator=torch.Generator().manual_seed(seed), **extra)


def make_folder_loader(root: str, size: int, batch_size: int, workers: int, s: float = 1.0,
                       seed: int = 0) -> torch.utils.data.DataLoader:
    """The same two-view transform over JPEG files with ``torchvision.datasets.ImageFolder``
    (Pillow decoding in the workers), as ImageNet SimCLR code usually reads its data."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(root, transform=TwoViews(simclr_transform(size, s)))
    extra = dict(persistent_workers=True, prefetch_factor=2) if workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       generator=torch.Generator().manual_seed(seed), **extra)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Plain NT-Xent over 2B projections (rows [0, B) view 1, [B, 2B) view 2), mean over 2B."""
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, views, temperature: float,
               device: torch.device) -> torch.Tensor:
    """One float32 step: forward both views as one batch, NT-Xent, backward, SGD."""
    x = torch.cat(views).to(device, non_blocking=True)
    out = model(x)
    z = out[0] if isinstance(out, tuple) else out
    loss = nt_xent(z, temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
