"""Labelled subsets for semi-supervised fine-tuning (paper section 3: 1 % and 10 % of labels).

``label_subset`` draws a class-balanced, seeded subset of a labelled training set. Each class
is shuffled once with the seed and the first k images are kept, so for one seed a smaller
subset is always contained in a larger one (1 % inside 10 %).

``read_subset_file``/``write_subset_file`` use the format of the official ImageNet subset
files ``1percent.txt``/``10percent.txt``: one image id per line, e.g. ``n01440764_10026.JPEG``
(a file name) or, for an image folder, a path relative to the split (``cat/0001.jpg``).
"""
from __future__ import annotations

import math
import os
import posixpath
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
    """Sorted indices of the samples listed in ``path``, one id per line.

    An id names a sample exactly (an image folder's ids are paths relative to the split, e.g.
    ``cat/0001.jpg``) or, as in the official files, by its file name alone (``0001.jpg``) when
    just one sample has that name. Blank lines are ignored and repeats count once. Ids naming
    no sample, or more than one, raise a ``ValueError`` that names the file and the first few.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subset file {path} not found; pass a file with one image id per line")
    wanted = list(dict.fromkeys(line.strip() for line in path.read_text().splitlines() if line.strip()))
    if not wanted:
        raise ValueError(f"subset file {path} lists no images")
    by_id: dict[str, list[int]] = {}
    by_name: dict[str, list[int]] = {}
    for i, image_id in enumerate(map(str, image_ids)):
        by_id.setdefault(image_id, []).append(i)
        by_name.setdefault(posixpath.basename(image_id), []).append(i)
    matches = {w: by_id.get(posixpath.normpath(w)) or ([] if "/" in w else by_name.get(w, [])) for w in wanted}
    unknown = [w for w, found in matches.items() if not found]
    if unknown:
        raise ValueError(f"{len(unknown)} image ids in {path} are not in the dataset: {_shown(unknown)}; "
                         "check that the file matches this dataset's training split")
    ambiguous = [f"{w} ({', '.join(str(image_ids[i]) for i in found[:3])})" for w, found in matches.items()
                 if len(found) > 1]
    if ambiguous:
        raise ValueError(f"{len(ambiguous)} image ids in {path} name more than one image: {_shown(ambiguous)}; "
                         "write each as its path relative to the split folder")
    return torch.tensor(sorted({found[0] for found in matches.values()}), dtype=torch.long)


def _shown(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def write_subset_file(path: PathLike, image_ids: Iterable[str]) -> None:
    """Write one image id per line (the official ``1percent.txt`` format)."""
    Path(path).write_text("".join(f"{image_id}\n" for image_id in image_ids))
