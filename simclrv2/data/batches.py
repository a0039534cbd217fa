"""What the stages ask of the data layer: batch sources, view makers and preprocessing.

Each stage iterates a *batch source* (``set_epoch(epoch, start_batch)``, ``len``, iteration
yielding ``(images, labels)``) and turns each batch into model inputs on the device. Two
pretraining paths exist (``--augmentation``):

* ``batched`` (default): uint8 images are gathered straight from memory and augmented as
  whole tensor batches on the device with per-image random parameters drawn from a
  checkpointed generator, so a resumed run sees exactly the same views. Image folders are
  decoded by DataLoader workers, which also cut each view's random crop from the full image
  (as the official code crops before resizing); the batch then gets the rest on the device.
* ``torchvision``: the classic per-image PIL pipeline in DataLoader workers; views are made
  in the workers, so resumption continues the schedule but not the exact random views.

Worker-side randomness is seeded per sample (``loader._sample_seed``), so folder runs also
resume exactly.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from .augment import EvalTransform, PILViewsDataset, SimCLRAugment, finetune_augment, torchvision_simclr_transform
from .datasets import DataError, ImageFolderDataset, build_dataset
from .loader import PRELOAD_MAX_BYTES, FileLoader, make_loader, shard_indices

ViewMaker = Callable[[Any, torch.Generator], Tensor]


def _first_then_second(pairs: Tensor) -> Tensor:
    """(B, 2, ...) per-image pairs as (2B, ...): every image's first, then every image's second."""
    return pairs.transpose(0, 1).flatten(0, 1)


def native_image_size(dataset: Any) -> int:
    """Side length of the dataset's images (in-memory sets) or its decode size (folders)."""
    return int(dataset.image_size)


def train_batches(dataset: Any, batch_size: int, seed: int, rank: int, world_size: int,
                  device: torch.device, num_workers: Optional[int] = None) -> Any:
    """Shuffled, sharded, full batches of ``(uint8 images, labels)`` on ``device``."""
    return make_loader(dataset, batch_size, shuffle=True, drop_last=True, seed=seed, rank=rank,
                       world_size=world_size, device=device, num_workers=num_workers)


def eval_batches(dataset: Any, batch_size: int, rank: int, world_size: int, device: torch.device,
                 num_workers: Optional[int] = None) -> Any:
    """Every example exactly once over all ranks, in order, no padding. One pass, so image
    folders get workers that end with it (not persistent ones left behind by each evaluation)."""
    return make_loader(dataset, batch_size, shuffle=False, drop_last=False, seed=0, rank=rank,
                       world_size=world_size, device=device, num_workers=num_workers, persistent_workers=False)


AUGMENTATIONS = ("batched", "torchvision")


def pretrain_views(kind: str, dataset: Any, batch_size: int, seed: int, rank: int, world_size: int,
                   device: torch.device, image_size: int, strength: float, use_blur: bool,
                   num_workers: Optional[int] = None) -> tuple[Any, ViewMaker]:
    """(batch source, ``make_views(batch, generator) -> views``) for pretraining: ``views`` is
    (2B, 3, S, S), the first view of every image in rows ``[0, B)`` and the second in ``[B, 2B)``
    (the layout NT-Xent takes)."""
    if kind == "batched":
        folder = isinstance(dataset, ImageFolderDataset)
        if folder:  # each sample arrives as its two crops (B, 2, 3, S, S)
            dataset = dataset.with_mode("train", crops=2)
        augment = SimCLRAugment(image_size, color_jitter_strength=strength, use_blur=use_blur, crop=not folder)

        def make_views(batch: Any, generator: torch.Generator) -> Tensor:
            images = batch[0]
            if folder:  # both crops in one call, as SimCLRAugment.views does
                return augment(_first_then_second(images), generator)
            return augment.views(images, 2, generator)
        return train_batches(dataset, batch_size, seed, rank, world_size, device, num_workers), make_views
    if kind == "torchvision":
        transform = torchvision_simclr_transform(image_size, strength, blur=use_blur)
        if isinstance(dataset, ImageFolderDataset):  # the PIL transform crops the full image itself
            dataset = dataset.with_mode("decode")
        views_set = PILViewsDataset(dataset, transform, num_views=2)
        source = FileLoader(views_set, batch_size, shuffle=True, drop_last=True, seed=seed, rank=rank,
                            world_size=world_size, num_workers=num_workers, device=device)

        def pil_views(batch: Any, generator: torch.Generator) -> Tensor:
            return _first_then_second(batch[0])
        return source, pil_views
    raise DataError(f"--augmentation must be one of {', '.join(AUGMENTATIONS)}, got {kind!r}")


def crop_flip_inputs(dataset: Any, image_size: int) -> tuple[Any, SimCLRAugment]:
    """(dataset to load, batch augmentation) for fine-tuning and distillation: random resized
    crop + flip (paper section 3). Image folders crop the full image in the workers."""
    if isinstance(dataset, ImageFolderDataset):
        return dataset.with_mode("train"), finetune_augment(image_size, crop=False)
    return dataset, finetune_augment(image_size)


def eval_inputs(dataset: Any, image_size: int) -> tuple[Any, EvalTransform]:
    """(dataset to load, batch preprocessing) for evaluation and feature extraction: the
    official centre crop above 32 px, then resize. Image folders do both in the workers."""
    if isinstance(dataset, ImageFolderDataset):
        return dataset.with_mode("eval"), EvalTransform(image_size, crop=False)
    return dataset, EvalTransform(image_size)


def split_size(dataset: str, data_dir: Optional[str], split: str) -> int:
    return len(build_dataset(dataset, data_dir, split))


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

    def __init__(self, dataset: Any, batch_size: int, seed: int, rank: int, world_size: int, device: torch.device,
                 num_workers: Optional[int] = None):
        if not 1 <= batch_size <= len(dataset) // world_size:
            raise DataError(f"{len(dataset)} labelled images give no batch of {batch_size} per process; lower "
                            "--train-batch-size or raise --label-fraction / --labels-per-class")
        self.loader = train_batches(dataset, batch_size, seed, rank, world_size, device, num_workers)
        self._next_step: Optional[int] = None
        self._batches: Optional[Iterator[Any]] = None

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        epoch, index = divmod(step, len(self.loader))
        if step != self._next_step or index == 0:
            self.loader.set_epoch(epoch, index)
            self._batches = iter(self.loader)
        self._next_step = step + 1
        return next(self._batches)
