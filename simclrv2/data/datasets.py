"""Datasets: small image sets held in memory as uint8 tensors, and lazily decoded image folders.

In-memory sets (Fashion-MNIST, CIFAR-10/100, STL-10) are :class:`TensorImageDataset` objects
with ``images`` (N, 3, H, W) uint8 (grey images are a stride-0 view replicated to 3 channels,
since the model always takes RGB like the official one), ``labels`` (N,) int64 or None, and
class names. They are read from the datasets' standard local files, never downloaded:

* Fashion-MNIST: the four official IDX files (``.gz`` or not), by default from
  ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package ``dataset-fashion-mnist``);
* CIFAR-10/100: the python-pickle batches (``cifar-10-batches-py/``, ``cifar-100-python/``),
  read directly (no md5 check, unlike torchvision) -- pickles run code, so only use trusted files;
* STL-10: the binary files in ``stl10_binary/`` (column-major images, labels 1..10 -> 0..9).

Image folders (``root/<class>/<image>``) are :class:`ImageFolderDataset` objects that decode
lazily with Pillow (libjpeg-turbo) in DataLoader workers and return fixed-size uint8 tensors so
they batch; training crops are cut there from the full decoded image, as the official code does.
"""
from __future__ import annotations

import gzip
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .augment import CROP_PROPORTION, center_crop_box, crop_resize, sample_crop_boxes

PathLike = Union[str, os.PathLike]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
DATASETS = ("embedded", "fashion_mnist", "cifar10", "cifar100", "stl10", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
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
        """Per-sample ids for subset files (the given ids, else the sample index as text)."""
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
        ids = None if self.ids is None else [self.ids[i] for i in idx.tolist()]
        return TensorImageDataset(images, labels, self.classes, self.name, ids)


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
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="bytes")
    except Exception as err:  # noqa: BLE001 -- any unpickling failure means a damaged file
        raise DataError(f"cannot read CIFAR batch {path}: {err}; replace the file") from err
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
        data = np.asarray(batch["data"], dtype=np.uint8)
        batch_labels = np.asarray(batch[spec["label_key"]], dtype=np.int64)
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
    """``root/<class>/**/<image>`` decoded lazily to uint8 tensors.

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
                 crops: int = 1):
        if image_size <= 0:
            raise DataError(f"image_size must be positive, got {image_size}")
        self.root = Path(root)
        self.image_size, self.skip_bad_images = image_size, skip_bad_images
        self._set_mode(mode, crops, crop_proportion)
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder {self.root} does not exist; pass the folder that holds "
                                       "one sub-folder per class as --data-dir")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DataError(f"no class folders in {self.root}; expected {self.root}/<class>/<image files>")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        exts = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[str, int]] = []
        self.empty_classes: list[str] = []
        for c in self.classes:
            files = _list_images(self.root / c, exts)
            if not files:
                if not skip_bad_images:
                    raise DataError(f"class folder {self.root / c} has no images ({', '.join(exts)}); remove it, "
                                    "add images, or pass --skip-bad-images to allow empty classes")
                self.empty_classes.append(c)
                warnings.warn(f"class folder {self.root / c} has no images; the class is kept but empty")
            self.samples.extend((f, self.class_to_idx[c]) for f in files)
        if not self.samples:
            raise DataError(f"no images ({', '.join(exts)}) found under {self.root}")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def labels(self) -> Tensor:
        return torch.tensor(self.targets, dtype=torch.long)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sample_ids(self) -> list[str]:
        """File names (e.g. ``n01440764_10026.JPEG``), the ids used by official subset files."""
        return [os.path.basename(path) for path, _ in self.samples]

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
            image = decode_rgb(path)
        except Exception as err:  # noqa: BLE001 -- decoders raise OSError, ValueError, SyntaxError...
            raise DataError(f"cannot decode image {path}: {err}. Replace or delete the file, or pass "
                            "--skip-bad-images to skip unreadable images") from err
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


def decode_rgb(path: PathLike) -> Tensor:
    """Decode an image file to uint8 (3, H, W) RGB (grey, palette, RGBA, CMYK converted; first
    frame of animations). Uses Pillow, as ``torchvision.io`` decoding is deprecated."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decode now, so truncated or corrupt data raises here
        rgb = img.convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def _list_images(directory: Path, extensions: tuple[str, ...]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if f.lower().endswith(extensions) and not f.startswith("."))
    return found


def _folder_split_dir(data_dir: Path, split: str) -> Path:
    if split not in _FOLDER_SPLITS:
        raise DataError(f"folder split must be one of {sorted(_FOLDER_SPLITS)}, got {split!r}")
    for name in _FOLDER_SPLITS[split]:
        if (data_dir / name).is_dir():
            return data_dir / name
    raise DatasetNotFoundError(f"no {' or '.join(_FOLDER_SPLITS[split])} sub-folder in {data_dir}; a folder dataset "
                               f"needs {data_dir}/train/<class>/<images> and {data_dir}/val/<class>/<images>")


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------
Dataset = Union[TensorImageDataset, ImageFolderDataset]


def build_dataset(name: str, data_dir: Optional[PathLike] = None, split: str = "train",
                  image_size: Optional[int] = None, skip_bad_images: bool = False,
                  folder_mode: Optional[str] = None) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`; ``embedded`` = Fashion-MNIST).

    In-memory sets keep their native size (``image_size`` is applied later by the batched
    augmentation or eval transform). For ``folder``, ``split`` selects ``data_dir/train`` or
    ``data_dir/val`` (or ``test``), ``image_size`` defaults to 224 and ``folder_mode``
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
            raise DataError("the folder dataset needs --data-dir (a folder with train/ and val/ sub-folders)")
        mode = folder_mode or ("train" if split == "train" else "eval")
        return ImageFolderDataset(_folder_split_dir(Path(data_dir), split), image_size or 224, mode, skip_bad_images)
    raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
