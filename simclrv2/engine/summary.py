"""The one-screen summary printed at the end of each stage."""
from __future__ import annotations

from pathlib import Path
from typing import Any

_SHOWN = ("step", "epoch", "loss", "contrast_acc", "sup_acc", "linear_eval_top1", "top1", "top5",
          "images_per_s", "skipped_steps", "wall_time_s")


def format_summary(stage: str, run_dir: Path, metrics: dict[str, Any], runtime: dict[str, Any]) -> str:
    """A short, aligned block: what ran where, the headline metrics and the output folder."""
    lines = [f"== {stage} done " + "=" * max(0, 50 - len(stage))]
    for key in _SHOWN:
        if key in metrics:
            value = metrics[key]
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"  {key:<18} {text}")
    lines.append("  " + ", ".join(f"{k}={v}" for k, v in runtime.items()))
    lines.append(f"  outputs            {run_dir} (config.json, metrics.jsonl, checkpoints/)")
    return "\n".join(lines)


def print_summary(stage: str, run_dir: Path, metrics: dict[str, Any], runtime: dict[str, Any]) -> None:
    print(format_summary(stage, run_dir, metrics, runtime), flush=True)
