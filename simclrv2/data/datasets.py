"""Datasets: small image sets held in memory as uint8 tensors, and lazily decoded image folders.

In-memory sets (Fashion-MNIST, CIFAR-10/100, STL-10) are :class:`TensorImageDataset` objects
with ``images`` (N, 3, H, W) uint8 (grey images are a stride-0 view replicated to 3 channels,
since the model always takes RGB like the official one), ``labels`` (N,) int64 or None, and
class names. They are read from the datasets' standard local files, never downloaded:

* Fashion-MNIST: the four official IDX files (``.gz`` or not), by default from
  ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package ``dataset-fashion-mnist``);
* CIFAR-10/100: the python-pickle batches (``cifar-10-batches-py/``, ``cifar-100-python/``),
  through an unpickler that builds only what those files hold (:mod:`.unpickle`), so a crafted
  batch is refused instead of running code;
* STL-10: the binary files in ``stl10_binary/`` (column-major images, labels 1..10 -> 0..9).

Image folders (``root/<split>/<class>/<image>``, or any folder of images for pretraining) are
:class:`ImageFolderDataset` objects that decode lazily and defensively with Pillow
(libjpeg-turbo, :mod:`.images`) in DataLoader workers and return fixed-size uint8 tensors so
they batch; training crops are cut there from the full decoded image, as the official code does.

Every split of a dataset numbers its classes alike: ``classes`` lists the class names in index
order, fixed per dataset (CIFAR, STL-10, Fashion-MNIST) or, for folders, by the training split.
"""
from __future__ import annotations

import gzip
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .augment import CROP_PROPORTION, center_crop_box, crop_resize, sample_crop_boxes
from .images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, ImageError, decode_rgb_array, list_images
from .unpickle import load_cifar_pickle

PathLike = Union[str, os.PathLike]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
DATASETS = ("embedded", "fashion_mnist", "cifar10", "cifar100", "stl10", "folder")
FOLDER_MODES = ("eval", "train", "decode")
DEFAULT_DATA_DIR = Path("data")
_FOLDER_SPLITS = {"train": ("train",), "val": ("val", "validation", "test"), "test": ("test", "val", "validation")}
SPLITS = {"fashion_mnist": ("train", "test"), "cifar10": ("train", "test"), "cifar100": ("train", "test"),
          "stl10": ("train", "test", "unlabeled", "train+unlabeled"), "folder": tuple(_FOLDER_SPLITS)}


class DataError(ValueError):
    """A dataset that is missing, malformed or wrongly requested; the message says the fix."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The dataset's files are not where they were looked for."""


def _dataset_key(name: str) -> str:
    """``name`` as the loaders know it: lower case, ``_`` for ``-``, ``embedded`` = ``fashion_mnist``."""
    key = name.lower().replace("-", "_")
    return "fashion_mnist" if key == "embedded" else key


def dataset_splits(name: str) -> tuple[str, ...]:
    """The splits :func:`build_dataset` accepts for dataset ``name`` (none for an unknown name)."""
    return SPLITS.get(_dataset_key(name), ())


def _where(directory: Path, data_dir: Optional[PathLike]) -> str:
    """``directory`` for a not-found message, saying when it is only the default of --data-dir."""
    if data_dir is not None:
        return str(directory)
    shown = directory if directory.is_absolute() else f"./{directory}"
    return f"{shown} (the default --data-dir, as none was given)"


# ----------------------------------------------------------------------------------------------
# In-memory datasets
# ----------------------------------------------------------------------------------------------
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
            raise DataError(f"{self.name}: {self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")
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


def _grey_to_rgb(images: Tensor) -> Tensor:
    """(N, H, W) -> (N, 3, H, W) stride-0 view (no copy)."""
    return images.unsqueeze(1).expand(-1, 3, -1, -1)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# ----------------------------------------------------------------------------------------------
def _find_file(directory: Path, stem: str) -> Optional[Path]:
    for candidate in (directory / (stem + ".gz"), directory / stem):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: PathLike, expected_magic: int) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) of unsigned bytes; checks magic number and size.

    Magic numbers: 0x801 for 1-D label files, 0x803 for 3-D image files (big-endian header).
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read IDX file {path}: {err}; the file is damaged, replace it") from err
    if len(data) < 4:
        raise DataError(f"IDX file {path} is truncated ({len(data)} bytes); replace it")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataError(f"IDX file {path} has magic number {magic:#x}, expected {expected_magic:#x}; "
                        "it is not an unsigned-byte IDX file of the right kind")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {path} is truncated in its header; replace it")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims)) + header
    if len(data) != expected:
        raise DataError(f"IDX file {path} has {len(data)} bytes but its header {dims} needs {expected}; "
                        "the file is truncated or damaged, replace it")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(data_dir: Optional[PathLike] = None, split: str = "train") -> TensorImageDataset:
    """Fashion-MNIST from its official IDX files (``train-*``/``t10k-*``, gzipped or not)."""
    if split not in SPLITS["fashion_mnist"]:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    directory = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    image_file = _find_file(directory, f"{prefix}-images-idx3-ubyte")
    label_file = _find_file(directory, f"{prefix}-labels-idx1-ubyte")
    if image_file is None or label_file is None:
        missing = f"{prefix}-images-idx3-ubyte[.gz]" if image_file is None else f"{prefix}-labels-idx1-ubyte[.gz]"
        raise DatasetNotFoundError(
            f"Fashion-MNIST file {missing} not found in {_where(directory, data_dir)}: install it with "
            "'apt-get install dataset-fashion-mnist' or put the four official IDX files in --data-dir")
    images = read_idx(image_file, 0x803)
    labels = read_idx(label_file, 0x801)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"Fashion-MNIST {split}: {images.shape[0]} images in {image_file} but "
                        f"{labels.shape[0]} labels in {label_file}; the files do not belong together")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"Fashion-MNIST labels in {label_file} must be 0..9, found {int(labels.max())}")
    return TensorImageDataset(_grey_to_rgb(torch.from_numpy(images.copy())),
                              torch.from_numpy(labels.astype(np.int64)), FASHION_MNIST_CLASSES,
                              f"fashion_mnist-{split}")


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle batches)
# ----------------------------------------------------------------------------------------------
_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], meta="batches.meta", label_key="labels", names_key="label_names",
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", num_classes=10),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
                     label_key="fine_labels", names_key="fine_label_names",
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", num_classes=100),
}


def _unpickle(path: Path) -> dict:
    """A CIFAR batch through the restricted unpickler: a crafted file is refused, never run."""
    try:
        with open(path, "rb") as f:
            raw = load_cifar_pickle(f)
    except Exception as err:  # noqa: BLE001 -- any unpickling failure means a damaged or crafted file
        raise DataError(f"cannot read CIFAR batch {path}: {err}; replace the file") from None
    if not isinstance(raw, dict):
        raise DataError(f"CIFAR batch {path} does not hold a dict; it is not a CIFAR python batch")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def load_cifar(name: str, data_dir: Optional[PathLike] = None, split: str = "train") -> TensorImageDataset:
    """CIFAR-10 or CIFAR-100 (fine labels) from the python-pickle batches.

    ``data_dir`` may be the extracted folder itself or its parent (default ``./data``).
    """
    if name not in _CIFAR:
        raise DataError(f"unknown CIFAR variant {name!r}; use one of {sorted(_CIFAR)}")
    if split not in SPLITS[name]:
        raise DataError(f"{name} split must be 'train' or 'test', got {split!r}")
    spec = _CIFAR[name]
    root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    directory = root / spec["folder"] if (root / spec["folder"]).is_dir() else root
    files = [directory / f for f in spec[split]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{name} {split} batch {missing[0]} not found in {_where(directory, data_dir)}: download {spec['url']} and "
            f"extract it so that {spec['folder']}/ is inside --data-dir")
    images, labels = [], []
    for f in files:
        batch = _unpickle(f)
        if "data" not in batch or spec["label_key"] not in batch:
            raise DataError(f"CIFAR batch {f} lacks 'data' or '{spec['label_key']}'; it is not a {name} batch")
        data = batch["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
            raise DataError(f"CIFAR batch {f}: 'data' is not a uint8 numpy array; replace the file")
        batch_labels = np.asarray(batch[spec["label_key"]])
        if batch_labels.ndim != 1 or batch_labels.dtype.kind not in "iu":
            raise DataError(f"CIFAR batch {f}: '{spec['label_key']}' is not a list of integers; replace the file")
        batch_labels = batch_labels.astype(np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != batch_labels.shape[0]:
            raise DataError(f"CIFAR batch {f}: data {data.shape} and {batch_labels.shape[0]} labels do not "
                            "match the (N, 3072) layout; replace the file")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    label_tensor = torch.from_numpy(np.concatenate(labels))
    if label_tensor.numel() and (label_tensor.min() < 0 or label_tensor.max() >= spec["num_classes"]):
        raise DataError(f"{name} labels in {directory} must be 0..{spec['num_classes'] - 1}")
    meta = directory / spec["meta"]
    if meta.is_file():
        names = _unpickle(meta).get(spec["names_key"])
        if not isinstance(names, (list, tuple)):
            raise DataError(f"{meta} lacks the list '{spec['names_key']}' of class names; replace the file")
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        if len(classes) != spec["num_classes"]:
            raise DataError(f"{meta} lists {len(classes)} class names, expected {spec['num_classes']}")
    else:
        classes = CIFAR10_CLASSES if name == "cifar10" else tuple(str(i) for i in range(100))
    return TensorImageDataset(torch.from_numpy(np.concatenate(images)), label_tensor, classes, f"{name}-{split}")


# ----------------------------------------------------------------------------------------------
# STL-10 (binary files)
# ----------------------------------------------------------------------------------------------
_STL_SIZE = 96


def _stl_images(path: Path, in_memory: bool) -> Tensor:
    nbytes = path.stat().st_size
    per_image = 3 * _STL_SIZE * _STL_SIZE
    if nbytes == 0 or nbytes % per_image:
        raise DataError(f"STL-10 file {path} has {nbytes} bytes, not a multiple of {per_image} (3x96x96); "
                        "the file is truncated or damaged, replace it")
    if in_memory:
        array = np.fromfile(path, dtype=np.uint8)
    else:  # copy-on-write memory map: pages are read when a batch touches them
        array = np.memmap(path, dtype=np.uint8, mode="c")
    # stored per image as 3 planes in column-major order: (N, C, W, H) -> (N, C, H, W)
    images = torch.from_numpy(array).view(-1, 3, _STL_SIZE, _STL_SIZE).transpose(2, 3)
    return images.contiguous() if in_memory else images


def load_stl10(data_dir: Optional[PathLike] = None, split: str = "train") -> TensorImageDataset:
    """STL-10 from ``stl10_binary/``; splits train, test, unlabeled (memory-mapped, labels None)
    and train+unlabeled (loaded, labels -1 for the unlabeled part)."""
    if split not in SPLITS["stl10"]:
        raise DataError(f"stl10 split must be one of {SPLITS['stl10']}, got {split!r}")
    root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    directory = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
    parts = ["train", "unlabeled"] if split == "train+unlabeled" else [split]
    needed = [f"{p}_X.bin" for p in parts] + [f"{p}_y.bin" for p in parts if p != "unlabeled"]
    missing = [n for n in needed if not (directory / n).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"STL-10 file {missing[0]} not found in {_where(directory, data_dir)}: download "
            "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz and extract it so that "
            "stl10_binary/ is inside --data-dir")
    names_file = directory / "class_names.txt"
    classes = tuple(names_file.read_text().split()) if names_file.is_file() else STL10_CLASSES
    images, labels = [], []
    for part in parts:
        x = _stl_images(directory / f"{part}_X.bin", in_memory=split != "unlabeled")
        images.append(x)
        if part == "unlabeled":
            labels.append(None if split == "unlabeled" else torch.full((x.shape[0],), -1, dtype=torch.long))
            continue
        y = torch.from_numpy(np.fromfile(directory / f"{part}_y.bin", dtype=np.uint8).astype(np.int64)) - 1
        if y.shape[0] != x.shape[0]:
            raise DataError(f"STL-10 {part}: {x.shape[0]} images but {y.shape[0]} labels; the files do not match")
        if y.numel() and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"STL-10 labels in {directory / f'{part}_y.bin'} must be 1..{len(classes)}")
        labels.append(y)
    image_tensor = images[0] if len(images) == 1 else torch.cat(images)
    label_tensor = labels[0] if len(labels) == 1 else torch.cat(labels)
    return TensorImageDataset(image_tensor, label_tensor, classes, f"stl10-{split}")


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------
class ImageFolderDataset(torch.utils.data.Dataset):
    """``root/<class>/**/<image>`` (or, unlabelled, ``root/**/<image>``) decoded lazily to uint8 tensors.

    Classes are numbered by one list of names, ``classes`` (default: the class folders of
    ``root``, sorted), so that every split of a dataset can share its training split's numbering:
    a class folder that is not in the list is an error, a class without a folder is simply
    empty. With ``labelled=False`` every image under ``root`` is a sample with label -1, in
    class folders or not, since pretraining needs no labels.

    Files are found and decoded by :mod:`simclrv2.data.images`: links followed without loops,
    each real file once, sizes above ``max_pixels`` refused, every image mode to 8-bit RGB,
    EXIF orientation applied, data that ends early an error. ``sample_ids`` are the paths
    relative to ``root`` (e.g. ``cat/0001.jpg``), which label files may name.

    ``mode``:

    * ``"eval"``: the official eval preprocessing, (3, S, S): an aspect-preserving centre crop
      of ``crop_proportion`` (default 0.875 above 32 px, none at 32 px or less), then resize;
    * ``"train"``: ``crops`` independent random crops of the whole image with the official crop
      rule (``crop_and_resize``), each resized: (3, S, S) for one crop (fine-tuning,
      distillation), (crops, 3, S, S) otherwise (pretraining: one crop per view; the batched
      augmentation then flips, jitters and blurs);
    * ``"decode"``: the decoded image at its own size (for per-image PIL transforms, which crop
      it themselves).

    Resizing is TensorFlow's un-antialiased half-pixel bicubic
    (:func:`~simclrv2.data.augment.crop_resize`), rounded to uint8.

    ``dataset[i]`` is ``(image, label, skipped)``; ``skipped`` counts unreadable files that
    were replaced to produce this sample (0 normally), so the count survives DataLoader workers
    and the loop can sum it. Unreadable files raise :class:`DataError` unless
    ``skip_bad_images`` is true, in which case the next readable sample is used instead (and
    empty class folders are tolerated).
    """

    def __init__(self, root: PathLike, image_size: int = 224, mode: str = "eval", skip_bad_images: bool = False,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, crop_proportion: Optional[float] = None,
                 crops: int = 1, classes: Optional[Sequence[str]] = None, labelled: bool = True,
                 max_pixels: int = MAX_IMAGE_PIXELS):
        if image_size <= 0:
            raise DataError(f"image_size must be positive, got {image_size}")
        self.root = Path(root)
        self.image_size, self.skip_bad_images, self.max_pixels = image_size, skip_bad_images, max_pixels
        self._set_mode(mode, crops, crop_proportion)
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder {self.root} does not exist; pass the folder that holds "
                                       "one sub-folder per class as --data-dir")
        exts = tuple(e.lower() for e in extensions)
        self.empty_classes: list[str] = []
        if labelled:
            self.name = f"folder {self.root}"
            self.classes = list(classes) if classes is not None else class_folders(self.root)
            self.samples = self._labelled_samples(exts)
        else:
            self.name = f"folder {self.root} (unlabelled: labelled stages need train/<class>/ and val/<class>/)"
            self.classes = []
            self.samples = [(f, -1) for f in _list_images(self.root, exts, {})]
        if not self.samples:
            raise DataError(f"no images ({', '.join(exts)}) found under {self.root}")

    def _labelled_samples(self, exts: tuple[str, ...]) -> list[tuple[str, int]]:
        if not self.classes:
            raise DataError(f"no class folders in {self.root}; expected {self.root}/<class>/<image files>")
        known = set(self.classes)
        unknown = [c for c in class_folders(self.root) if c not in known]
        if unknown:
            raise DataError(f"class folder(s) {', '.join(unknown)} in {self.root} are not among the dataset's "
                            f"{len(self.classes)} classes ({_shown(self.classes)}), which the training split "
                            "defines; add them to train/ or remove them here")
        samples: list[tuple[str, int]] = []
        seen: dict[str, str] = {}  # one image under two class folders (through links) is an error
        for index, c in enumerate(self.classes):
            if not (self.root / c).is_dir():
                continue  # a split may lack some classes; the others keep their indices
            files = _list_images(self.root / c, exts, seen)
            if not files:
                if not self.skip_bad_images:
                    raise DataError(f"class folder {self.root / c} has no images ({', '.join(exts)}); remove it, "
                                    "add images, or pass --skip-bad-images to allow empty classes")
                self.empty_classes.append(c)
                warnings.warn(f"class folder {self.root / c} has no images; the class is kept but empty")
            samples.extend((f, index) for f in files)
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def labels(self) -> Optional[Tensor]:
        """Labels (N,) int64, or None for an unlabelled folder."""
        return torch.tensor(self.targets, dtype=torch.long) if self.classes else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sample_ids(self) -> list[str]:
        """Paths relative to ``root`` with ``/`` (e.g. ``n01440764/n01440764_10026.JPEG``); label files
        name images by these or, as the official subset files do, by the file name alone."""
        return [os.path.relpath(path, self.root).replace(os.sep, "/") for path, _ in self.samples]

    def _set_mode(self, mode: str, crops: int, crop_proportion: Optional[float]) -> None:
        if mode not in FOLDER_MODES:
            raise DataError(f"folder mode must be one of {FOLDER_MODES}, got {mode!r}")
        if crops < 1:
            raise DataError(f"crops must be at least 1, got {crops}")
        if crop_proportion is None and self.image_size > 32:
            crop_proportion = CROP_PROPORTION
        self.mode, self.crops, self.crop_proportion = mode, crops, crop_proportion

    def _copy(self) -> "ImageFolderDataset":
        new = object.__new__(ImageFolderDataset)
        new.__dict__.update(self.__dict__)
        return new

    def subset(self, indices: Union[Tensor, Sequence[int]]) -> "ImageFolderDataset":
        """A copy holding only the samples at ``indices``."""
        new = self._copy()
        new.samples = [self.samples[i] for i in torch.as_tensor(indices, dtype=torch.long).tolist()]
        return new

    def with_mode(self, mode: str, crops: int = 1) -> "ImageFolderDataset":
        """A copy of the same samples read in another ``mode`` (see the class docstring)."""
        new = self._copy()
        new._set_mode(mode, crops, self.crop_proportion)
        return new

    def load(self, index: int) -> Tensor:
        """Decode and preprocess one image; raises :class:`DataError` naming a bad file."""
        path = self.samples[index][0]
        try:
            image = decode_rgb(path, self.max_pixels)
        except Exception as err:  # noqa: BLE001 -- decoders raise OSError, ValueError, SyntaxError...
            raise DataError(f"cannot decode image {path}: {err}. Replace or delete the file, or pass "
                            "--skip-bad-images to skip unreadable images") from None
        return self._transform(image)

    def _transform(self, image: Tensor) -> Tensor:
        if self.mode == "decode":
            return image
        _, height, width = image.shape
        size = self.image_size
        if self.mode == "train":
            crops = crop_resize(image, sample_crop_boxes(self.crops, height, width), size)
            return crops[0] if self.crops == 1 else crops
        box = (center_crop_box(height, width, size, size, self.crop_proportion) if self.crop_proportion
               else (0, 0, height, width))
        return crop_resize(image, box, size)[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        if not self.skip_bad_images:
            return self.load(index), self.samples[index][1], 0
        for skipped in range(len(self.samples)):
            i = (index + skipped) % len(self.samples)
            try:
                return self.load(i), self.samples[i][1], skipped
            except DataError as err:
                warnings.warn(str(err))
        raise DataError(f"no readable image under {self.root}; every file failed to decode")


def decode_rgb(path: PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Tensor:
    """Decode an image file to uint8 (3, H, W) RGB, trusting nothing in it
    (:func:`~simclrv2.data.images.decode_rgb_array`). Uses Pillow, as ``torchvision.io``
    decoding is deprecated."""
    array = decode_rgb_array(Path(path).read_bytes(), max_pixels)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def class_folders(directory: Path) -> list[str]:
    """The class names of a split: its visible sub-folder names, sorted."""
    return sorted(d.name for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))


def _list_images(directory: Path, extensions: tuple[str, ...], seen: dict[str, str]) -> list[str]:
    try:
        return list_images(str(directory), extensions, seen)
    except ImageError as err:
        raise DataError(f"{err}: an image cannot be in two class folders; remove one of them") from None
    except OSError as err:
        raise DataError(f"cannot list the images under {directory}: {err}") from None


def _shown(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_folder(data_dir: PathLike, split: str = "train", image_size: int = 224, mode: Optional[str] = None,
                skip_bad_images: bool = False) -> ImageFolderDataset:
    """A split of a folder dataset: ``data_dir/<split>/<class>/**/<image>``, classes numbered by the
    class folders of ``data_dir/train`` for every split (one mapping by class name).

    A folder with none of the split sub-folders (``train``, ``val``, ``validation``, ``test``)
    is, as its train split, every image under it, unlabelled: what pretraining needs.
    """
    data_dir = Path(data_dir)
    if split not in _FOLDER_SPLITS:
        raise DataError(f"folder split must be one of {sorted(_FOLDER_SPLITS)}, got {split!r}")
    mode = mode or ("train" if split == "train" else "eval")
    split_dirs = [data_dir / name for name in _FOLDER_SPLITS[split] if (data_dir / name).is_dir()]
    if split == "train" and not any((data_dir / name).is_dir() for names in _FOLDER_SPLITS.values() for name in names):
        return ImageFolderDataset(data_dir, image_size, mode, skip_bad_images, labelled=False)
    if not split_dirs:
        raise DatasetNotFoundError(f"no {' or '.join(_FOLDER_SPLITS[split])} sub-folder in {data_dir}; a labelled "
                                   f"folder dataset needs {data_dir}/train/<class>/<images> and "
                                   f"{data_dir}/val/<class>/<images>")
    train_dir = data_dir / "train"
    classes = class_folders(train_dir) if train_dir.is_dir() else None
    return ImageFolderDataset(split_dirs[0], image_size, mode, skip_bad_images, classes=classes)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------
Dataset = Union[TensorImageDataset, ImageFolderDataset]


def build_dataset(name: str, data_dir: Optional[PathLike] = None, split: str = "train",
                  image_size: Optional[int] = None, skip_bad_images: bool = False,
                  folder_mode: Optional[str] = None) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`; ``embedded`` = Fashion-MNIST).

    In-memory sets keep their native size (``image_size`` is applied later by the batched
    augmentation or eval transform). For ``folder`` (:func:`load_folder`), ``split`` selects
    ``data_dir/train`` or ``data_dir/val`` (or ``test``), or for pretraining a folder without
    those sub-folders, all of it; ``image_size`` defaults to 224 and ``folder_mode``
    defaults to ``train`` (one random crop per sample) for the train split and ``eval``
    otherwise; :mod:`simclrv2.data.batches` switches modes per use.
    """
    key = _dataset_key(name)
    if key == "fashion_mnist":
        return load_fashion_mnist(data_dir, split)
    if key in _CIFAR:
        return load_cifar(key, data_dir, split)
    if key == "stl10":
        return load_stl10(data_dir, split)
    if key == "folder":
        if data_dir is None:
            raise DataError("the folder dataset needs --data-dir (a folder of images; labelled stages need its train/ "
                            "and val/ sub-folders with one folder per class)")
        return load_folder(data_dir, split, image_size or 224, folder_mode, skip_bad_images)
    raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
