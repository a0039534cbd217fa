"""What the stages share: starting a run, fitting the batch to the data, the checkpoints a run
starts from, and the augmentation's generator."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch

from simclrv2.config import ConfigError, DataConfig, OptimConfig
from simclrv2.data.batches import native_image_size
from simclrv2.engine.checkpoint import CHECKPOINT_DIR, load_model, resolve_checkpoint_of_all_ranks, step_checkpoints
from simclrv2.engine.run_folder import checkpoint_identity, claim_run_folder, name_run_dir
from simclrv2.engine.runtime import Runtime
from simclrv2.models import SimCLRv2Model


def start_run(cfg: Any, stage: str, rt: Runtime, inputs: Optional[dict[str, Any]] = None) -> tuple[Path, Any]:
    """Name and claim the run folder; returns it and ``cfg`` with ``--run-dir`` set to it. The
    training loop saves that config there once its own resume checks have passed
    (``TrainTask.checkpoint_meta["config"]``). ``inputs``: the identities of the checkpoints the
    run starts from (:func:`load_input`).

    Without ``--resume`` a folder that already holds checkpoints is refused: the new run's
    checkpoints would be rotated out by the older, higher-numbered ones.
    """
    run_dir = name_run_dir(cfg.runtime.run_dir, stage, rt.is_main)
    cfg = replace(cfg, runtime=replace(cfg.runtime, run_dir=str(run_dir)))
    if not cfg.runtime.resume and step_checkpoints(run_dir / CHECKPOINT_DIR):
        raise ConfigError(f"--run-dir {run_dir} already holds checkpoints of an earlier run; pass --resume true "
                          "to continue it, or choose another --run-dir")
    claim_run_folder(run_dir, stage, cfg, inputs or {}, trains=True)
    return run_dir, cfg


def fit_batch_to_data(optim: OptimConfig, num_examples: int, rt: Runtime) -> OptimConfig:
    """``optim`` with the batch shrunk to the data where a small labelled subset holds fewer
    images than one batch."""
    largest = (num_examples // rt.world_size) * rt.world_size
    if largest == 0:
        raise ConfigError(f"only {num_examples} labelled images for {rt.world_size} processes; "
                          "raise --label-fraction or --labels-per-class")
    if optim.train_batch_size <= largest:
        return optim
    if rt.is_main:
        print(f"note: --train-batch-size {optim.train_batch_size} exceeds the {num_examples} training images; "
              f"using {largest}")
    return replace(optim, train_batch_size=largest)


def local_batch_size(optim: OptimConfig, rt: Runtime) -> int:
    return optim.train_batch_size // rt.world_size


def image_size_of(data: DataConfig, dataset: Any) -> int:
    """Configured image size, else the dataset's native size."""
    if data.image_size is not None:
        return data.image_size
    return native_image_size(dataset)


def augment_generator(seed: int, rank: int) -> torch.Generator:
    """The augmentation's random generator for this rank: on the host whatever the device, so
    the same seed gives the same parameters on CPU and GPU, they are drawn without GPU
    launches, and the batched augmentation does not wait for the GPU (``data.augment``)."""
    return torch.Generator().manual_seed(seed * 1000 + rank)


def load_input(checkpoint: str,
               num_classes: Optional[int] = None) -> tuple[SimCLRv2Model, dict[str, Any], dict[str, Any]]:
    """:func:`~simclrv2.engine.checkpoint.load_model` of a run's input checkpoint, with the
    identity of the file it resolved to (path, step, SHA-256), which the run records and compares
    on resume. Every rank loads the file that rank 0 resolved."""
    path = resolve_checkpoint_of_all_ranks(checkpoint)
    model, ckpt = load_model(str(path), num_classes)
    return model, ckpt, checkpoint_identity(path, ckpt)


def check_classes(recorded: Optional[list], num_outputs: int, classes: Any, checkpoint: str) -> None:
    """Labels meet a model's classifier: its recorded class names must be the data's, in the same
    order (a checkpoint without names, e.g. a converted one, must at least have as many outputs)."""
    classes = list(classes)
    if recorded is None:
        if num_outputs != len(classes):
            raise ConfigError(f"--checkpoint {checkpoint} has {num_outputs} classes but the data have {len(classes)}; "
                              "pass data with the checkpoint's classes, or another checkpoint")
        return
    recorded = list(recorded)
    if recorded == classes:
        return
    only_model = [c for c in recorded if c not in classes]
    only_data = [c for c in classes if c not in recorded]
    if only_model or only_data:
        detail = (f"only in the checkpoint: {', '.join(only_model) or 'none'}; only in the data: "
                  f"{', '.join(only_data) or 'none'}")
    else:
        detail = "the same classes in another order: " + ", ".join(
            f"{i}: {a} -> {b}" for i, (a, b) in enumerate(zip(recorded, classes)) if a != b)
    raise ConfigError(f"--checkpoint {checkpoint} was trained on other classes than the data ({detail}); pass data "
                      "with the checkpoint's classes, or another checkpoint")
