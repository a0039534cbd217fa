"""A label means the same class in every split and every label file (issue 20, class 4, data side):
one class mapping by name per dataset, label-file ids that name exactly one image, and ids of
in-memory samples that survive ``--subset``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclrv2.config import ConfigError, DataConfig, LabelConfig
from simclrv2.data.datasets import build_dataset
from simclrv2.data.errors import DataError
from simclrv2.data.folder import ImageFolderDataset
from simclrv2.data.in_memory import TensorImageDataset
from simclrv2.data.subsets import read_subset_file
from simclrv2.data.splits import labelled_indices, take_subset


def _image(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path)


def _splits(root: Path, train: str, val: str) -> None:
    for split, classes in (("train", train), ("val", val)):
        for c in classes:
            _image(root / split / c / f"{split}_{c}.png")


def test_every_split_numbers_classes_by_the_training_split(tmp_path):
    _splits(tmp_path, "abc", "ac")
    train = build_dataset("folder", tmp_path, "train", image_size=8)
    for split in ("val", "test"):
        val = build_dataset("folder", tmp_path, split, image_size=8)
        assert val.classes == train.classes == ["a", "b", "c"]
        assert dict(zip(val.sample_ids, val.targets)) == {"a/val_a.png": 0, "c/val_c.png": 2}
        assert val.labels.tolist() == [0, 2]


def test_an_eval_class_the_training_split_lacks_is_an_error(tmp_path):
    _splits(tmp_path, "ab", "abd")
    build_dataset("folder", tmp_path, "train", image_size=8)
    with pytest.raises(DataError, match=r"class folder\(s\) d in .*val are not among the dataset's 2 classes \(a, b\)"):
        build_dataset("folder", tmp_path, "val", image_size=8)


def test_a_split_alone_keeps_its_own_classes(tmp_path):
    """Without train/ (e.g. evaluating a checkpoint on val/ only) the split's folders are the classes;
    the checkpoint's recorded classes are then what catches a mismatch."""
    _splits(tmp_path, "", "bc")
    assert build_dataset("folder", tmp_path, "val", image_size=8).classes == ["b", "c"]


def _same_name_in_two_classes(root: Path) -> None:
    _image(root / "cat" / "x.png", 1)
    _image(root / "dog" / "x.png", 2)
    _image(root / "dog" / "y.png", 3)


def test_label_file_ids_name_one_image(tmp_path):
    _same_name_in_two_classes(tmp_path / "data")
    ds = ImageFolderDataset(tmp_path / "data", image_size=8)
    ids = ["cat/x.png", "dog/x.png", "dog/y.png"]
    assert ds.sample_ids == ids
    labels = tmp_path / "labels.txt"
    labels.write_text("dog/x.png\n")
    assert read_subset_file(labels, ids).tolist() == [1]  # not cat/x.png, which has the same file name
    labels.write_text("./dog/x.png\ny.png\n")  # a unique file name is enough
    assert read_subset_file(labels, ids).tolist() == [1, 2]
    labels.write_text("y.png\nx.png\n")
    with pytest.raises(ValueError, match=r"1 image ids in .*labels.txt name more than one image: "
                                         r"x.png \(cat/x.png, dog/x.png\)"):
        read_subset_file(labels, ids)
    labels.write_text("bird/x.png\n")
    with pytest.raises(ValueError, match=r"not in the dataset: bird/x.png"):
        read_subset_file(labels, ids)
    with pytest.raises(ValueError, match="name more than one image: 7"):
        labels.write_text("7\n")
        read_subset_file(labels, ["7", "8", "7"])  # ids that repeat are ambiguous too


def test_in_memory_ids_survive_subset(tmp_path):
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    full = TensorImageDataset(images, torch.arange(10) % 2, ("even", "odd"), "toy")
    part = full.subset([2, 5, 7])
    assert part.sample_ids == ["2", "5", "7"] and part.subset([2]).sample_ids == ["7"]
    labels = tmp_path / "labels.txt"
    labels.write_text("5\n7\n")
    chosen = part.subset(read_subset_file(labels, part.sample_ids))
    assert chosen.images[:, 0, 0, 0].tolist() == [5, 7]  # the images the file names, not positions 5 and 7


def test_subset_then_label_file_through_the_stages(tmp_path):
    """``--subset`` then ``--label-file``, as fine-tuning applies them: the file's ids keep naming
    the same images, and ids outside the subset are reported."""
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 2, 2).contiguous()
    full = TensorImageDataset(images, torch.arange(20) % 2, ("even", "odd"), "toy")
    part = take_subset(full, DataConfig(subset=6), seed=0)
    kept = [int(i) for i in part.sample_ids]
    labels = tmp_path / "labels.txt"
    labels.write_text(f"{kept[4]}\n{kept[1]}\n")
    chosen = part.subset(labelled_indices(LabelConfig(label_file=str(labels)), part, seed=0))
    assert chosen.images[:, 0, 0, 0].tolist() == sorted([kept[1], kept[4]])
    missing = next(i for i in range(20) if i not in kept)
    labels.write_text(f"{missing}\n")
    with pytest.raises(ConfigError, match=f"not in the dataset: {missing}"):
        labelled_indices(LabelConfig(label_file=str(labels)), part, seed=0)
