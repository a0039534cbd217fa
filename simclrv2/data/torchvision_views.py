"""The classic per-image torchvision pipeline (``--augmentation torchvision``, and a reference
for the batched one): PIL transforms in DataLoader workers."""
from __future__ import annotations

from typing import Optional

import torch

from simclrv2.data.blur import blur_kernel_radius
from simclrv2.data.crops import CROP_MIN_AREA


def torchvision_simclr_transform(image_size: int, s: float = 1.0, blur: Optional[bool] = None,
                                 color: bool = True, interpolation: str = "bilinear", crop_min_area: float = CROP_MIN_AREA):
    """The usual per-image PIL SimCLR pipeline from torchvision, returning a float tensor.

    RandomResizedCrop(crop_min_area-1, 3/4-4/3), flip, RandomApply(ColorJitter(0.8s, 0.8s, 0.8s, 0.2s),
    p=0.8), RandomGrayscale(0.2), RandomApply(GaussianBlur, p=0.5) with the official kernel size,
    ToTensor. ``blur`` defaults to the official rule (on above 32 px); ``interpolation`` is the
    crop resize (torchvision's default bilinear; the official code uses bicubic). Note
    torchvision's brightness/contrast/saturation differ in detail from TensorFlow's.
    """
    import torchvision.transforms as T

    blur = image_size > 32 if blur is None else blur
    ops = [T.RandomResizedCrop(image_size, scale=(crop_min_area, 1.0), ratio=(3 / 4, 4 / 3),
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
