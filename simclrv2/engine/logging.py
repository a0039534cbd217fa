"""Metrics: one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard (rank 0 only)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Optional

from simclrv2.engine.checkpoint import atomic_write

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _summary_writer_class() -> type:
    """torch's TensorBoard writer, kept from importing TensorFlow (seconds) when that is installed.

    Writing event files needs no TensorFlow; TensorBoard's own ``compat.notf`` switch selects
    its built-in stub.
    """
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


class MetricsLogger:
    """Appends ``{"kind": "step"|"epoch"|..., "step": N, ...}`` records; no-op off the main rank."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True,
                 start_step: Optional[int] = None):
        """``start_step``: the step a run starts or resumes from. What an earlier attempt logged after
        it (before being killed and resumed from an older checkpoint) is dropped from both outputs,
        so that the curves never double back."""
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._writer = None
        if enabled and start_step is not None:
            drop_records_after(run_dir, start_step)
        if enabled and self.path.is_symlink():  # a copy of what it shows replaces the link: appends never follow one
            content = self.path.read_bytes() if self.path.exists() else b""
            atomic_write(self.path, lambda handle: handle.write(content))
        if enabled and tensorboard:
            try:
                SummaryWriter = _summary_writer_class()
                purge = None if start_step is None else start_step + 1  # hides events at steps >= purge
                self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge)
            except ImportError:
                warnings.warn("tensorboard is not installed; metrics go to metrics.jsonl only")

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3),
                  **{k: _plain(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key not in {"kind", "step", "time"} and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)
        return record

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _at_or_before(line: str, step: int) -> bool:
    """Whether a ``metrics.jsonl`` line is a record of ``step`` or earlier; a torn line is not."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step


def drop_records_after(run_dir: Path, step: int) -> None:
    """Rewrite ``metrics.jsonl`` atomically with only the records of ``step`` and earlier (every kind:
    each is logged at the step it follows, before that step's checkpoint), also dropping a torn last
    line that the next append would otherwise run into."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    text = path.read_text()
    kept = "".join(line + "\n" for line in text.splitlines() if _at_or_before(line, step))
    if kept == text:
        return
    atomic_write(path, lambda handle: handle.write(kept.encode()))


def read_metrics(run_dir: Path, kind: Optional[str] = None) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl`` (optionally only one kind); a torn last line is ignored."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records
