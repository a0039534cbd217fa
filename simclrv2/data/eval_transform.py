"""Deterministic evaluation preprocessing on batches (official ``preprocess_for_eval``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from simclrv2.data.crops import CROP_PROPORTION, center_crop_box, same_boxes
from simclrv2.data.image_batch import as_rgb, check_batch, float32_math
from simclrv2.data.resize import resize_boxes


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

    @float32_math
    def __call__(self, images: Tensor) -> Tensor:
        check_batch(images)
        images = as_rgb(images)
        n, _, height, width = images.shape
        size = self.image_size
        if not self.crop and (height, width) == (size, size):
            x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
            return x.clamp(0.0, 1.0)
        box = center_crop_box(height, width, size, size, self.crop_proportion) if self.crop else (0, 0, height, width)
        return resize_boxes(images, same_boxes(n, box, images.device), size,
                            interpolation=self.interpolation).clamp_(0.0, 1.0)

