"""Datasets: what every kind offers, and loading one by name.

Two kinds implement :class:`ImageDataset`: images held in memory
(:class:`~.in_memory.TensorImageDataset`: Fashion-MNIST, CIFAR-10/100, STL-10, read by
:mod:`.readers`) and lazily decoded image folders (:class:`~.folder.ImageFolderDataset`).
Each kind decides itself how it is batched and where its images are cropped, so the loops in
:mod:`.batches` never ask which kind they hold.

Every split of a dataset numbers its classes alike: ``classes`` lists the class names in index
order, fixed per dataset (CIFAR, STL-10, Fashion-MNIST) or, for folders, by the training split.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence, Union

from torch import Tensor

from .augment import SimCLRAugment, ViewMaker
from .crops import CROP_MIN_AREA
from .errors import DataError
from .eval_transform import EvalTransform
from .folder import FOLDER_SPLITS, load_folder
from .readers import READER_SPLITS, load_cifar, load_fashion_mnist, load_stl10

if TYPE_CHECKING:
    from simclrv2.engine.runtime import Runtime

PathLike = Union[str, os.PathLike]

DATASETS = ("embedded", "fashion_mnist", "cifar10", "cifar100", "stl10", "folder")
SPLITS = {**READER_SPLITS, "folder": tuple(FOLDER_SPLITS)}


class ImageDataset(Protocol):
    """What the stages use of a dataset. ``dataset[i]`` is ``(image uint8, label, ...)`` with
    label -1 when unlabelled; ``labels`` is None for an unlabelled set. The ``*_inputs`` methods
    return the dataset to load for a use and the batch transform that completes it on the device."""

    name: str
    classes: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Any, ...]: ...

    @property
    def image_size(self) -> int: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def labels(self) -> Optional[Tensor]: ...

    @property
    def sample_ids(self) -> list[str]: ...

    def subset(self, indices: Union[Tensor, Sequence[int]]) -> "ImageDataset": ...

    def loader(self, batch_size: int, rt: "Runtime", *, shuffle: bool, drop_last: bool, seed: int,
               num_workers: Optional[int] = None, persistent_workers: bool = True) -> Any:
        """Sharded ``(images, labels)`` batches on ``rt.device`` (the batch-source interface)."""

    def pretrain_inputs(self, image_size: int, strength: float, use_blur: bool,
                        crop_min_area: float = CROP_MIN_AREA) -> tuple["ImageDataset", ViewMaker]:
        """(dataset to load, ``make_views(batch, generator)``) for two SimCLR views per image."""

    def crop_flip_inputs(self, image_size: int, crop_min_area: float = CROP_MIN_AREA) -> tuple["ImageDataset", SimCLRAugment]:
        """Random resized crop + flip: fine-tuning and distillation (paper section 3)."""

    def eval_inputs(self, image_size: int) -> tuple["ImageDataset", EvalTransform]:
        """The official centre crop above 32 px, then resize: evaluation and features."""

    def full_images(self) -> "ImageDataset":
        """Images at their own size, for per-image PIL transforms."""


def _dataset_key(name: str) -> str:
    """``name`` as the loaders know it: lower case, ``_`` for ``-``, ``embedded`` = ``fashion_mnist``."""
    key = name.lower().replace("-", "_")
    return "fashion_mnist" if key == "embedded" else key


def dataset_splits(name: str) -> tuple[str, ...]:
    """The splits :func:`build_dataset` accepts for dataset ``name`` (none for an unknown name)."""
    return SPLITS.get(_dataset_key(name), ())



def build_dataset(name: str, data_dir: Optional[PathLike] = None, split: str = "train",
                  image_size: Optional[int] = None, skip_bad_images: bool = False,
                  folder_mode: Optional[str] = None) -> ImageDataset:
    """Load dataset ``name`` (one of :data:`DATASETS`; ``embedded`` = Fashion-MNIST).

    In-memory sets keep their native size (``image_size`` is applied later by the batched
    augmentation or eval transform). For ``folder`` (:func:`load_folder`), ``split`` selects
    ``data_dir/train`` or ``data_dir/val`` (or ``test``), or for pretraining a folder without
    those sub-folders, all of it; ``image_size`` defaults to 224 and ``folder_mode``
    defaults to ``train`` (one random crop per sample) for the train split and ``eval``
    otherwise; the ``*_inputs`` methods switch modes per use.
    """
    key = _dataset_key(name)
    if key == "fashion_mnist":
        return load_fashion_mnist(data_dir, split)
    if key in ("cifar10", "cifar100"):
        return load_cifar(key, data_dir, split)
    if key == "stl10":
        return load_stl10(data_dir, split)
    if key == "folder":
        if data_dir is None:
            raise DataError("the folder dataset needs --data-dir (a folder of images; labelled stages need its train/ "
                            "and val/ sub-folders with one folder per class)")
        return load_folder(data_dir, split, image_size or 224, folder_mode, skip_bad_images)
    raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
