"""Readers of the standard datasets' local files into :class:`~.in_memory.TensorImageDataset`.

Never downloaded, and read without trusting the files:

* Fashion-MNIST: the four official IDX files (``.gz`` or not), by default from
  ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package ``dataset-fashion-mnist``);
* CIFAR-10/100: the python-pickle batches (``cifar-10-batches-py/``, ``cifar-100-python/``),
  through an unpickler that builds only what those files hold (:mod:`.unpickle`), so a crafted
  batch is refused instead of running code;
* STL-10: the binary files in ``stl10_binary/`` (column-major images, labels 1..10 -> 0..9).

Grey images become a stride-0 view replicated to 3 channels, since the model always takes RGB
like the official one.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from .errors import DataError, DatasetNotFoundError
from .in_memory import TensorImageDataset
from .unpickle import load_cifar_pickle

PathLike = Union[str, os.PathLike]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
DEFAULT_DATA_DIR = Path("data")
READER_SPLITS = {"fashion_mnist": ("train", "test"), "cifar10": ("train", "test"), "cifar100": ("train", "test"),
                 "stl10": ("train", "test", "unlabeled", "train+unlabeled")}


def _where(directory: Path, data_dir: Optional[PathLike]) -> str:
    """``directory`` for a not-found message, saying when it is only the default of --data-dir."""
    if data_dir is not None:
        return str(directory)
    shown = directory if directory.is_absolute() else f"./{directory}"
    return f"{shown} (the default --data-dir, as none was given)"


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
    if split not in READER_SPLITS["fashion_mnist"]:
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
    if split not in READER_SPLITS[name]:
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
    if split not in READER_SPLITS["stl10"]:
        raise DataError(f"stl10 split must be one of {READER_SPLITS['stl10']}, got {split!r}")
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

