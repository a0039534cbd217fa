"""Tiny datasets written in the official Fashion-MNIST IDX format, for end-to-end tests.

Each class is a bright bar at its own position and angle on a noisy background, so a few
training steps are enough for the losses to fall and for accuracy to rise above chance.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

NUM_CLASSES = 10


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_images(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) uint8 images and (n,) labels cycling over the classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    images = rng.uniform(0, 60, size=(n, size, size))
    for i, label in enumerate(labels):
        angle = np.pi * label / NUM_CLASSES
        distance = np.abs(np.cos(angle) * xx + np.sin(angle) * yy - 0.15 * (label % 3 - 1))
        images[i] += 190 * (distance < 0.08)
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_tiny_fashion_mnist(directory: Path, n_train: int = 96, n_test: int = 40, seed: int = 0) -> Path:
    """Write the four IDX files (train-*, t10k-*) into ``directory`` and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n, offset in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = make_images(n, seed + offset)
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory
