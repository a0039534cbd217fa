"""Labelled subsets for semi-supervised fine-tuning (paper section 3: 1 % and 10 % of labels).

``label_subset`` draws a class-balanced, seeded subset of a labelled training set. Each class
is shuffled once with the seed and the first k images are kept, so for one seed a smaller
subset is always contained in a larger one (1 % inside 10 %).

``read_subset_file``/``write_subset_file`` use the format of the official ImageNet subset
files ``1percent.txt``/``10percent.txt``: one image file name per line, e.g.
``n01440764_10026.JPEG``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

PathLike = Union[str, os.PathLike]


def per_class_count(class_size: int, fraction: float) -> int:
    """round(fraction * class_size) with halves rounded up, and at least 1."""
    return max(1, math.floor(fraction * class_size + 0.5))


def label_subset(labels: Union[Tensor, Sequence[int]], fraction: Optional[float] = None,
                 per_class: Optional[int] = None, seed: int = 0) -> Tensor:
    """Sorted indices of a class-balanced subset: ``fraction`` of each class (at least one
    image per class) or exactly ``per_class`` images per class. Negative labels (unlabeled
    samples) are never chosen. Reproducible from ``seed``.
    """
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction (e.g. 0.01) or per_class (e.g. 10)")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    classes = torch.unique(labels[labels >= 0])
    if classes.numel() == 0:
        raise ValueError("the dataset has no labelled samples to draw a subset from")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in classes.tolist():
        members = torch.nonzero(labels == c).flatten()
        k = per_class if per_class is not None else per_class_count(members.numel(), fraction)
        if k > members.numel():
            raise ValueError(f"class {c} has only {members.numel()} labelled images, fewer than the "
                             f"{k} per class requested; lower --labels-per-class")
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:k]])
    return torch.sort(torch.cat(chosen)).values


def read_subset_file(path: PathLike, image_ids: Sequence[str]) -> Tensor:
    """Sorted indices of the samples whose id (file name) is listed in ``path``.

    Blank lines are ignored, repeated names count once; names not among ``image_ids`` raise a
    ``ValueError`` that names the first few and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subset file {path} not found; pass a file with one image name per line")
    wanted = list(dict.fromkeys(line.strip() for line in path.read_text().splitlines() if line.strip()))
    if not wanted:
        raise ValueError(f"subset file {path} lists no images")
    position = {}
    for i, image_id in enumerate(image_ids):
        position.setdefault(os.path.basename(str(image_id)), i)
    unknown = [w for w in wanted if os.path.basename(w) not in position]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ValueError(f"{len(unknown)} image ids in {path} are not in the dataset: {shown}; "
                         "check that the file matches this dataset's training split")
    return torch.sort(torch.tensor([position[os.path.basename(w)] for w in wanted], dtype=torch.long)).values


def write_subset_file(path: PathLike, image_ids: Iterable[str]) -> None:
    """Write one image id per line (the official ``1percent.txt`` format)."""
    Path(path).write_text("".join(f"{image_id}\n" for image_id in image_ids))
