"""What the stages ask of the data layer: batch sources, view makers and preprocessing.

Each stage iterates a *batch source* (``set_epoch(epoch, start_batch)``, ``len``, iteration
yielding ``(images, labels)``) and turns each batch into model inputs on the device. Every
dataset kind (:class:`~.datasets.ImageDataset`) says itself how it is batched and what its
batches still need, so nothing here asks which kind it is. Two pretraining paths exist
(``--augmentation``):

* ``batched`` (default): uint8 images are gathered straight from memory and augmented as
  whole tensor batches on the device with per-image random parameters drawn from a
  checkpointed generator, so a resumed run sees exactly the same views. Image folders are
  decoded by DataLoader workers, which also cut each view's random crop from the full image
  (as the official code crops before resizing); the batch then gets the rest on the device.
* ``torchvision``: the classic per-image PIL pipeline in DataLoader workers; views are made
  in the workers, so resumption continues the schedule but not the exact random views.

Worker-side randomness is seeded per sample (``loader._sample_seed``), so folder runs also
resume exactly. ``rt`` is the stage's :class:`~simclrv2.engine.runtime.Runtime` (its rank,
world size and device place the batches); ``seed`` is the stream's shuffling seed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from torch import Tensor

from .augment import ViewMaker, first_then_second
from .crops import CROP_MIN_AREA
from .datasets import ImageDataset
from .errors import DataError
from .loader import PRELOAD_MAX_BYTES, FileLoader, shard_indices
from .torchvision_views import PILViewsDataset, torchvision_simclr_transform

if TYPE_CHECKING:
    from simclrv2.engine.runtime import Runtime

AUGMENTATIONS = ("batched", "torchvision")


def native_image_size(dataset: ImageDataset) -> int:
    """Side length of the dataset's images (in-memory sets) or its decode size (folders)."""
    return int(dataset.image_size)


def train_batches(dataset: ImageDataset, batch_size: int, rt: "Runtime", *, seed: int,
                  num_workers: Optional[int] = None) -> Any:
    """Shuffled, sharded, full batches of ``(uint8 images, labels)`` on ``rt.device``."""
    return dataset.loader(batch_size, rt, shuffle=True, drop_last=True, seed=seed, num_workers=num_workers)


def eval_batches(dataset: ImageDataset, batch_size: int, rt: "Runtime", *, num_workers: Optional[int] = None) -> Any:
    """Every example exactly once over all ranks, in order, no padding. One pass, so image
    folders get workers that end with it (not persistent ones left behind by each evaluation)."""
    return dataset.loader(batch_size, rt, shuffle=False, drop_last=False, seed=0, num_workers=num_workers,
                          persistent_workers=False)


def pretrain_views(dataset: ImageDataset, rt: "Runtime", *, augmentation: str, batch_size: int, seed: int,
                   image_size: int, strength: float, use_blur: bool, crop_min_area: float = CROP_MIN_AREA,
                   num_workers: Optional[int] = None) -> tuple[Any, ViewMaker]:
    """(batch source, ``make_views(batch, generator) -> views``) for pretraining: ``views`` is
    (2B, 3, S, S), the first view of every image in rows ``[0, B)`` and the second in ``[B, 2B)``
    (the layout NT-Xent takes)."""
    if augmentation == "batched":
        views_set, make_views = dataset.pretrain_inputs(image_size, strength, use_blur, crop_min_area)
        return train_batches(views_set, batch_size, rt, seed=seed, num_workers=num_workers), make_views
    if augmentation == "torchvision":  # the PIL transform crops the full image itself
        transform = torchvision_simclr_transform(image_size, strength, blur=use_blur, crop_min_area=crop_min_area)
        views_set = PILViewsDataset(dataset.full_images(), transform, num_views=2)
        source = FileLoader(views_set, batch_size, shuffle=True, drop_last=True, seed=seed, rank=rt.rank,
                            world_size=rt.world_size, num_workers=num_workers, device=rt.device)

        def pil_views(batch: Any, generator: torch.Generator) -> Tensor:
            return first_then_second(batch[0])
        return source, pil_views
    raise DataError(f"--augmentation must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r}")


class TensorBatches:
    """Batches of precomputed tensors (e.g. frozen features), with the batch-source interface.
    Up to ``PRELOAD_MAX_BYTES`` of them move to an accelerator ``device`` once, not per batch."""

    def __init__(self, features: Tensor, labels: Tensor, batch_size: int, seed: int = 0, shuffle: bool = True,
                 device: Optional[torch.device] = None):
        if device is not None and device.type != "cpu" and features.nbytes <= PRELOAD_MAX_BYTES:
            features, labels = features.to(device), labels.to(device)
        self.features, self.labels = features, labels
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.device = device
        self.epoch, self.start_batch = 0, 0
        self._len = len(features) // batch_size if shuffle else -(-len(features) // batch_size)
        if self._len == 0:
            raise DataError(f"{len(features)} examples give no batch of {batch_size}; lower --train-batch-size")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = shard_indices(len(self.features), self.epoch, self.seed, self.shuffle, drop_last=self.shuffle)
        order = order.to(self.features.device)
        start, self.start_batch = self.start_batch, 0
        for b in range(start, self._len):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.features[idx].to(self.device), self.labels[idx].to(self.device)


class StepBatches:
    """``stream(step)``: the batch for training step ``step`` of an endless shuffled pass over
    ``dataset``, for a second data stream (the labelled part of distillation).

    The batch is a pure function of the step, so the stream resumes exactly without state of its
    own; consecutive steps read one loader in order, any other step restarts it there.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, rt: "Runtime", *, seed: int,
                 num_workers: Optional[int] = None):
        if not 1 <= batch_size <= len(dataset) // rt.world_size:
            raise DataError(f"{len(dataset)} labelled images give no batch of {batch_size} per process; lower "
                            "--train-batch-size or raise --label-fraction / --labels-per-class")
        self.loader = train_batches(dataset, batch_size, rt, seed=seed, num_workers=num_workers)
        self._next_step: Optional[int] = None
        self._batches: Optional[Iterator[Any]] = None

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        epoch, index = divmod(step, len(self.loader))
        if step != self._next_step or index == 0:
            self.loader.set_epoch(epoch, index)
            self._batches = iter(self.loader)
        self._next_step = step + 1
        return next(self._batches)
