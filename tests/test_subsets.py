"""Class-balanced label subsets and the official subset-file format."""
from __future__ import annotations

import pytest
import torch

from simclrv2.data.subsets import label_subset, per_class_count, read_subset_file, write_subset_file


def _labels() -> torch.Tensor:
    """Class c has 20 + 5c samples, shuffled; a few unlabeled (-1) samples mixed in."""
    labels = torch.cat([torch.full((20 + 5 * c,), c) for c in range(6)] + [torch.full((7,), -1)])
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]


def test_fraction_is_per_class_with_half_up_rounding():
    labels = _labels()
    idx = label_subset(labels, fraction=0.1, seed=1)
    counts = torch.bincount(labels[idx], minlength=6)
    # class sizes 20, 25, 30, 35, 40, 45 -> 2, 2.5, 3, 3.5, 4, 4.5 -> 2, 3, 3, 4, 4, 5
    assert counts.tolist() == [2, 3, 3, 4, 4, 5]
    assert (labels[idx] >= 0).all()
    assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == idx.numel()
    assert per_class_count(1000, 0.0001) == 1  # at least one per class


def test_per_class_exact_and_whole_set():
    labels = _labels()
    idx = label_subset(labels, per_class=7, seed=0)
    assert torch.bincount(labels[idx], minlength=6).tolist() == [7] * 6
    everything = label_subset(labels, fraction=1.0)
    assert torch.equal(everything, torch.nonzero(labels >= 0).flatten())


def test_seeded_reproducible_and_nested():
    labels = _labels()
    a = label_subset(labels, fraction=0.2, seed=3)
    assert torch.equal(a, label_subset(labels, fraction=0.2, seed=3))
    assert not torch.equal(a, label_subset(labels, fraction=0.2, seed=4))
    small = set(label_subset(labels, fraction=0.05, seed=3).tolist())
    assert small <= set(a.tolist())  # 1 % inside 10 % for the same seed


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one"),
    (dict(fraction=0.1, per_class=2), "exactly one"),
    (dict(fraction=0.0), r"\(0, 1\]"),
    (dict(fraction=1.5), r"\(0, 1\]"),
    (dict(per_class=0), ">= 1"),
    (dict(per_class=21), "class 0 has only 20"),
])
def test_impossible_requests(kwargs, match):
    with pytest.raises(ValueError, match=match):
        label_subset(_labels(), **kwargs)


def test_subset_file_round_trip(tmp_path):
    ids = [f"n0144_{i}.JPEG" for i in range(10)]
    path = tmp_path / "1percent.txt"
    write_subset_file(path, [ids[7], ids[2], ids[5]])
    assert path.read_text() == "n0144_7.JPEG\nn0144_2.JPEG\nn0144_5.JPEG\n"
    assert read_subset_file(path, ids).tolist() == [2, 5, 7]
    path.write_text("\n n0144_3.JPEG \n\nn0144_3.JPEG\n")  # blank lines and repeats
    assert read_subset_file(path, ids).tolist() == [3]
    nested = [f"/data/train/n0144/{i}" for i in ids]  # ids given as paths match by file name
    assert read_subset_file(path, nested).tolist() == [3]


def test_subset_file_errors(tmp_path):
    ids = ["a.JPEG", "b.JPEG"]
    path = tmp_path / "subset.txt"
    path.write_text("a.JPEG\nzz1.JPEG\nzz2.JPEG\n")
    with pytest.raises(ValueError, match=r"2 image ids in .*subset.txt.*zz1.JPEG, zz2.JPEG"):
        read_subset_file(path, ids)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_subset_file(tmp_path / "missing.txt", ids)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no images"):
        read_subset_file(path, ids)
