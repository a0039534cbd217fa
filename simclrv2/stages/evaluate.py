"""Top-1 / top-5 accuracy of any checkpoint with a classifier on a labelled split."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from simclrv2.config import ConfigError, EvaluateConfig, save_config, validate_data, validate_runtime
from simclrv2.data.splits import load_split
from simclrv2.engine.checkpoint import write_json
from simclrv2.engine.evaluation import evaluate_model
from simclrv2.engine.run_folder import claim_run_folder, releases_run_folders
from simclrv2.engine.runtime import setup_runtime
from simclrv2.stages import common as C

# Runtime options that only a training stage reads.
TRAINING_ONLY = frozenset(f"runtime.{name}" for name in (
    "max_steps", "resume", "checkpoint_steps", "keep_checkpoint_max", "log_every_steps", "on_nonfinite", "max_skipped_steps",
    "compile"))


def validate(cfg: EvaluateConfig) -> None:
    """Refuse impossible settings before any work starts."""
    if cfg.checkpoint is None:
        raise ConfigError("--checkpoint is required: a .pt file or a run folder")
    validate_data(cfg.data)
    validate_runtime(cfg.runtime)


@releases_run_folders
def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate ``--checkpoint`` on ``--eval-split``; prints and returns the accuracies, and with
    ``--run-dir`` also writes them there as ``eval.json`` beside the resolved ``config.json``: in
    a folder of its own, which a rerun with other settings or another checkpoint may not reuse."""
    validate(cfg)
    training_only = sorted(f"--{name.split('.')[-1].replace('_', '-')}" for name in cfg.explicit
                           if name in TRAINING_ONLY)
    if training_only:  # a warning, not an error: scripts pass one set of common flags to every command
        warnings.warn(f"evaluate does not train, so it ignores {', '.join(training_only)}")
    rt = setup_runtime(cfg.runtime)
    model, ckpt, identity = C.load_input(cfg.checkpoint)
    if model.supervised_head is None:
        raise ConfigError(f"--checkpoint {cfg.checkpoint} has no classifier; evaluate a fine-tuned, distilled or "
                          "linear-eval-while-pretraining checkpoint")
    image_size = cfg.data.image_size or ckpt.get("image_size") or 224
    eval_set = load_split(cfg.data, cfg.data.eval_split, image_size)
    C.check_classes(ckpt.get("classes"), model.supervised_head.linear.out_features, eval_set.classes, cfg.checkpoint)
    run_dir = None if cfg.runtime.run_dir is None else Path(cfg.runtime.run_dir)
    if run_dir is not None:  # before the work, so that a refused folder costs nothing
        claim_run_folder(run_dir, "evaluate", cfg, {"checkpoint": identity})
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    result = evaluate_model(model, cfg.data, image_size, rt, eval_set)
    result = {"checkpoint": identity["path"], "split": cfg.data.eval_split, **result}
    if rt.is_main:
        print(json.dumps(result, indent=2))
        if run_dir is not None:
            save_config(cfg, run_dir)
            write_json(run_dir / "eval.json", result)
    return result
