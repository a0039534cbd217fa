"""Pre-emption end to end: a run stopped by a signal saves, leaves a marker a job script can read
(torchrun turns the exit code 75 into 1), and the SLURM example requeues itself on that marker."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from simclrv2.config import RuntimeConfig
from simclrv2.data.batches import TensorBatches
from simclrv2.engine.checkpoint import step_checkpoints
from simclrv2.engine.runtime import Runtime
from simclrv2.engine.trainer import EXIT_INTERRUPTED, INTERRUPTED_MARKER, Interrupted, TrainTask, train

PROJECT = Path(__file__).resolve().parents[1]
CPU = Runtime(torch.device("cpu"), None, False, 0, 1)


def _task(signal_at: int) -> TrainTask:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))

    def step_fn(batch, step):
        if step == signal_at:  # as SLURM's (or torchrun's) SIGTERM arriving during a step
            os.kill(os.getpid(), signal.SIGTERM)
        inputs, targets = batch
        return nn.functional.cross_entropy(model(inputs), targets), {}

    return TrainTask(stage="toy", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     batches=TensorBatches(x, y, 8), step_fn=step_fn, lr_fn=lambda s: 0.1, total_steps=8,
                     images_per_step=8, checkpoint_meta={})


def test_a_run_stopped_by_a_signal_leaves_a_marker_until_it_resumes(tmp_path: Path) -> None:
    cfg = RuntimeConfig(progress=False, checkpoint_steps=100)
    with pytest.raises(Interrupted) as err:
        train(_task(signal_at=2), CPU, cfg, tmp_path)
    assert err.value.exit_code == EXIT_INTERRUPTED
    assert json.loads((tmp_path / INTERRUPTED_MARKER).read_text())["signal"] == "SIGTERM"
    assert [p.name for p in step_checkpoints(tmp_path / "checkpoints")] == ["ckpt-000000003.pt"]
    metrics = train(_task(signal_at=-1), CPU, cfg, tmp_path)
    assert metrics["step"] == 8 and not (tmp_path / INTERRUPTED_MARKER).exists()


# --------------------------------------------------------------------------- the SLURM example script

_SRUN = """#!/usr/bin/env bash
# Stands in for srun + torchrun + the run: finishes, crashes, or saves and stops on SIGTERM.
while [ $# -gt 0 ]; do [ "$1" = --run-dir ] && run_dir=$2; shift; done
mkdir -p "$run_dir"
case "$STUB_RUN" in
  finish) exit 0 ;;
  crash) exit 1 ;;
  preempt)
    trap 'echo "{\\"signal\\": \\"SIGTERM\\", \\"step\\": 7}" > "$run_dir/interrupted.json"; exit 1' TERM
    touch "$run_dir/started"
    while true; do sleep 0.05; done ;;
esac
"""

_SCONTROL = """#!/usr/bin/env bash
if [ "$1" = show ]; then echo node001; exit 0; fi
echo "$*" >> "$SCONTROL_LOG"
"""


def _job(tmp_path: Path, behaviour: str) -> tuple[subprocess.Popen, Path, Path]:
    """The example script as SLURM would start it, with stub srun and scontrol first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", _SRUN), ("scontrol", _SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir, log = tmp_path / "run", tmp_path / "scontrol.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_RUN": behaviour, "SCONTROL_LOG": str(log),
           "RUN_DIR": str(run_dir), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node001",
           "SLURM_JOB_NUM_NODES": "1"}
    proc = subprocess.Popen(["bash", str(PROJECT / "scripts" / "slurm_example.sh"), "--train-epochs", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, run_dir, log


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_script_forwards_the_warning_signal_and_requeues_a_stopped_run(tmp_path: Path) -> None:
    proc, run_dir, log = _job(tmp_path, "preempt")
    deadline = time.time() + 20
    while not (run_dir / "started").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 delivers before the time limit
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert log.read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("behaviour, status", [("finish", 0), ("crash", 1)])
def test_slurm_script_does_not_requeue_a_finished_or_crashed_run(tmp_path: Path, behaviour: str, status: int) -> None:
    proc, _, log = _job(tmp_path, behaviour)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == status, out
    assert not log.exists()
