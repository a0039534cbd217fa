"""The images a stage trains and evaluates on: a dataset's splits, ``--subset`` and the labelled part."""
from __future__ import annotations

from typing import Optional

import torch

from simclrv2.config import ConfigError, DataConfig, LabelConfig, check_labels
from simclrv2.data.datasets import build_dataset, dataset_splits
from simclrv2.data.subsets import label_subset, read_subset_file


VAL_SEED = 0  # the val split is the same images whatever the run's --seed


def check_splits(data: DataConfig) -> None:
    """Refuse an ``--eval-split`` or ``--pretrain-split`` the dataset lacks, before any training."""
    valid = dataset_splits(data.dataset)
    valid = valid + ("val",) if "train" in valid and "val" not in valid else valid
    for flag, split in (("--eval-split", data.eval_split), ("--pretrain-split", data.pretrain_split)):
        if valid and split not in valid:
            raise ConfigError(f"{flag} {split!r} is not a split of --dataset {data.dataset}; choose one of: "
                              f"{', '.join(valid)}")


def load_split(data: DataConfig, split: str, image_size: Optional[int] = None):
    """A split of the dataset. Under ``--eval-split val`` (for a dataset without its own val
    split) ``val`` is a class-balanced ``--val-fraction`` of the training split and ``train`` is
    the rest, so that settings are chosen on images no stage trains on and the test split stays
    unseen."""
    check_splits(data)
    carved = data.eval_split == "val" and "val" not in dataset_splits(data.dataset)
    if not (carved and split in ("train", "val")):
        return build_dataset(data.dataset, data.data_dir, split, image_size=image_size,
                             skip_bad_images=data.skip_bad_images)
    train = build_dataset(data.dataset, data.data_dir, "train", image_size=image_size,
                          skip_bad_images=data.skip_bad_images)
    held_out = torch.zeros(len(train), dtype=torch.bool)
    held_out[label_subset(train.labels, fraction=data.val_fraction, seed=VAL_SEED)] = True
    return train.subset(torch.nonzero(held_out if split == "val" else ~held_out).flatten())


def take_subset(dataset, data: DataConfig, seed: int):
    """``--subset N``: N training images chosen by a seeded shuffle (for quick trials)."""
    if data.subset is None:
        return dataset
    n = min(data.subset, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return dataset.subset(order.sort().values)


def labelled_train_set(data: DataConfig, labels_cfg: LabelConfig, seed: int):
    """(training split after ``--subset``, its labelled part): the same labelled images for
    fine-tuning, linear evaluation and distillation."""
    train = take_subset(load_split(data, "train", data.image_size), data, seed)
    return train, train.subset(labelled_indices(labels_cfg, train, seed))


def labelled_indices(labels_cfg: LabelConfig, dataset, seed: int) -> torch.Tensor:
    """Indices of the labelled examples: a file of ids, a per-class count or a class-balanced fraction."""
    if dataset.labels is None:
        raise ConfigError(f"dataset {dataset.name!r} has no labels for this split; choose a labelled split")
    check_labels(labels_cfg)
    fraction = 1.0 if labels_cfg.label_fraction is None else labels_cfg.label_fraction
    try:
        if labels_cfg.label_file:
            return read_subset_file(labels_cfg.label_file, dataset.sample_ids)
        if labels_cfg.labels_per_class is not None:
            return label_subset(dataset.labels, per_class=labels_cfg.labels_per_class, seed=seed)
        if fraction == 1.0:
            return torch.arange(len(dataset))
        return label_subset(dataset.labels, fraction=fraction, seed=seed)
    except (ValueError, FileNotFoundError) as err:  # impossible requests, unknown ids, missing file
        raise ConfigError(f"labels: {err}") from None


def describe_labels(labels_cfg: LabelConfig) -> str:
    if labels_cfg.label_file:
        return f"ids in {labels_cfg.label_file}"
    if labels_cfg.labels_per_class is not None:
        return f"{labels_cfg.labels_per_class} per class"
    return f"{100 * (labels_cfg.label_fraction or 1.0):g} %"
