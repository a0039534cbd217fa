"""Top-1 / top-5 accuracy of any checkpoint with a classifier on a labelled split."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from simclrv2.config import ConfigError, EvaluateConfig, explicit_options, save_config
from simclrv2.engine.runtime import setup_runtime
from simclrv2.stages import common as C
from simclrv2.stages.finetune import evaluate_model

# Runtime options that only a training stage reads.
TRAINING_ONLY = frozenset(f"runtime.{name}" for name in (
    "max_steps", "resume", "checkpoint_steps", "keep_checkpoint_max", "log_every_steps", "on_nonfinite", "compile"))


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate ``--checkpoint`` on ``--eval-split``; prints and returns the accuracies, and with
    ``--run-dir`` also writes them there as ``eval.json`` beside the resolved ``config.json``."""
    if cfg.checkpoint is None:
        raise ConfigError("--checkpoint is required: a .pt file or a run folder")
    training_only = sorted(f"--{name.split('.')[-1].replace('_', '-')}" for name in explicit_options(cfg)
                           if name in TRAINING_ONLY)
    if training_only:  # a warning, not an error: scripts pass one set of common flags to every command
        warnings.warn(f"evaluate does not train, so it ignores {', '.join(training_only)}")
    rt = setup_runtime(cfg.runtime)
    model, ckpt = C.load_model(cfg.checkpoint)
    if model.supervised_head is None:
        raise ConfigError(f"--checkpoint {cfg.checkpoint} has no classifier; evaluate a fine-tuned, distilled or "
                          "linear-eval-while-pretraining checkpoint")
    image_size = cfg.data.image_size or ckpt.get("image_size") or 224
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    result = evaluate_model(model, cfg.data, image_size, rt)
    result = {"checkpoint": str(C.resolve_checkpoint(cfg.checkpoint)), "split": cfg.data.eval_split, **result}
    if rt.is_main:
        print(json.dumps(result, indent=2))
        if cfg.runtime.run_dir is not None:
            run_dir = Path(cfg.runtime.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir)
            (run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
