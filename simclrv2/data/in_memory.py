"""Images held in memory as one uint8 tensor: batches are gathered straight from it and
augmented whole on the device (no DataLoader workers)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .augment import SimCLRAugment, ViewMaker, finetune_augment
from .crops import CROP_MIN_AREA
from .errors import DataError
from .eval_transform import EvalTransform
from .loader import InMemoryLoader

if TYPE_CHECKING:
    from simclrv2.engine.runtime import Runtime


@dataclass
class TensorImageDataset:
    """Images (N, 3, H, W) uint8 with labels (N,) int64 or None (unlabeled) and class names.

    ``dataset[i]`` is ``(image (3, H, W) uint8, label int)``, with label -1 when unlabeled.
    """

    images: Tensor
    labels: Optional[Tensor]
    classes: tuple[str, ...]
    name: str
    ids: Optional[list[str]] = field(default=None, repr=False)

    def __repr__(self) -> str:
        labelled = "unlabeled" if self.labels is None else f"{self.num_classes} classes"
        return f"TensorImageDataset({self.name}: {len(self)} images {tuple(self.images.shape[1:])}, {labelled})"

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.shape[1] != 3 or self.images.dtype != torch.uint8:
            raise DataError(f"{self.name}: images must be uint8 (N, 3, H, W), got "
                            f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.name}: {self.images.shape[0]} images but labels of shape "
                            f"{tuple(self.labels.shape)}")
        if self.ids is not None and len(self.ids) != self.images.shape[0]:
            raise DataError(f"{self.name}: {self.images.shape[0]} images but {len(self.ids)} ids")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label = -1 if self.labels is None else int(self.labels[index])
        return self.images[index], label

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def sample_ids(self) -> list[str]:
        """Per-sample ids for label files: the given ids, else the sample's index in the full
        split as text. :meth:`subset` keeps them, so an id always names the same image."""
        return self.ids if self.ids is not None else [str(i) for i in range(len(self))]

    def subset(self, indices: Union[Tensor, Sequence[int]]) -> "TensorImageDataset":
        """The samples at ``indices`` (grey sets stay a replicated view, not a 3x copy)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        images = self.images
        if images.stride(1) == 0:
            images = images[:, :1].index_select(0, idx).expand(-1, 3, -1, -1)
        else:
            images = images.index_select(0, idx)
        labels = None if self.labels is None else self.labels.index_select(0, idx)
        ids = self.sample_ids
        return TensorImageDataset(images, labels, self.classes, self.name, [ids[i] for i in idx.tolist()])

    def loader(self, batch_size: int, rt: "Runtime", *, shuffle: bool, drop_last: bool, seed: int,
               num_workers: Optional[int] = None, persistent_workers: bool = True) -> InMemoryLoader:
        """Batches gathered from memory on ``rt.device``; there are no workers to configure."""
        return InMemoryLoader(self, batch_size, shuffle, drop_last, seed, rt.rank, rt.world_size, rt.device)

    def pretrain_inputs(self, image_size: int, strength: float, use_blur: bool,
                        crop_min_area: float = CROP_MIN_AREA) -> tuple["TensorImageDataset", ViewMaker]:
        """Whole images: both views are cropped, resized and augmented as one batch."""
        augment = SimCLRAugment(image_size, color_jitter_strength=strength, use_blur=use_blur,
                                area_range=(crop_min_area, 1.0))

        def make_views(batch: Any, generator: torch.Generator) -> Tensor:
            return augment.views(batch[0], 2, generator)
        return self, make_views

    def crop_flip_inputs(self, image_size: int, crop_min_area: float = CROP_MIN_AREA) -> tuple["TensorImageDataset", SimCLRAugment]:
        return self, finetune_augment(image_size, crop_min_area=crop_min_area)

    def eval_inputs(self, image_size: int) -> tuple["TensorImageDataset", EvalTransform]:
        return self, EvalTransform(image_size)

    def full_images(self) -> "TensorImageDataset":
        return self
