"""Non-finite values never reach a checkpoint: steps are judged on the loss and the gradients,
every save checks the state it writes, loading refuses poisoned files, and skipping has a limit."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from simclrv2.config import RuntimeConfig
from simclrv2.data.batches import TensorBatches
from simclrv2.engine.checkpoint import (CheckpointError, latest_valid_checkpoint, load_checkpoint, save_checkpoint,
                                        step_checkpoints)
from simclrv2.engine.runtime import Runtime
from simclrv2.engine.trainer import EXIT_NONFINITE, NonFiniteLoss, TrainTask, train

CPU = Runtime(torch.device("cpu"), None, False, 0, 1)


class _ScaledRuntime(Runtime):
    """A float32 run with a (CPU) GradScaler: the loop's fp16 path without a GPU."""

    def grad_scaler(self):
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)


def _task(*, nan_grad_at=(), nan_loss_at=(), lr_at=None, optimizer=torch.optim.SGD, total_steps=8) -> TrainTask:
    """A linear model whose gradient (or loss) is NaN at the given steps; ``lr_at`` overrides the
    learning rate by step (a huge one overflows the weights with finite gradients)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))

    def step_fn(batch, step):
        inputs, targets = batch
        logits = model(inputs)
        if step in nan_grad_at:
            logits.register_hook(lambda grad: grad * float("nan"))
        loss = nn.functional.cross_entropy(logits, targets)
        return (loss * float("nan") if step in nan_loss_at else loss), {}

    lr_fn = (lambda s: (lr_at or {}).get(s, 0.1))
    return TrainTask(stage="toy", model=model, optimizer=optimizer(model.parameters(), lr=0.1),
                     batches=TensorBatches(x, y, 8), step_fn=step_fn, lr_fn=lr_fn, total_steps=total_steps,
                     images_per_step=8, checkpoint_meta={})


def _all_finite(state) -> bool:
    if isinstance(state, dict):
        return all(_all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(_all_finite(v) for v in state)
    return not (torch.is_tensor(state) and state.is_floating_point()) or bool(torch.isfinite(state).all())


def _saved_checkpoints_are_finite(run_dir: Path) -> list[int]:
    """Steps of the checkpoints on disk, each checked to hold only finite model and optimiser values."""
    steps = []
    for path in step_checkpoints(run_dir / "checkpoints"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert _all_finite(ckpt["model"]) and _all_finite(ckpt["optimizer"]), f"{path.name} holds non-finite values"
        steps.append(ckpt["step"])
    return steps


def test_finite_loss_with_nan_gradient_stops_before_the_step(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLoss, match=r"non-finite gradients at step 3 .*ckpt-000000002\.pt") as err:
        train(_task(nan_grad_at={3}), CPU, RuntimeConfig(progress=False, checkpoint_steps=2), tmp_path)
    assert err.value.exit_code == EXIT_NONFINITE
    assert _saved_checkpoints_are_finite(tmp_path) == [2]


def test_nan_gradient_under_a_grad_scaler_never_reaches_the_weights(tmp_path: Path) -> None:
    """With loss scaling the scaler skips overflowing steps itself (fp16 overflows are routine)."""
    rt = _ScaledRuntime(torch.device("cpu"), None, False, 0, 1)
    metrics = train(_task(nan_grad_at={3}), rt, RuntimeConfig(progress=False, checkpoint_steps=2), tmp_path)
    assert metrics["step"] == 8
    assert _saved_checkpoints_are_finite(tmp_path)[-1] == 8
    with pytest.raises(NonFiniteLoss, match="non-finite loss"):  # a non-finite loss still stops the run
        train(_task(nan_loss_at={1}), rt, RuntimeConfig(progress=False), tmp_path / "loss")


def test_skipping_a_nan_gradient_keeps_the_weights_finite(tmp_path: Path) -> None:
    task = _task(nan_grad_at={3})
    metrics = train(task, CPU, RuntimeConfig(progress=False, on_nonfinite="skip", checkpoint_steps=2), tmp_path)
    assert metrics["skipped_steps"] == 1 and metrics["step"] == 8
    assert all(torch.isfinite(p).all() for p in task.model.parameters())
    assert _saved_checkpoints_are_finite(tmp_path)[-1] == 8


def test_skipping_stops_past_the_limit(tmp_path: Path) -> None:
    cfg = RuntimeConfig(progress=False, on_nonfinite="skip", max_skipped_steps=2, checkpoint_steps=2)
    with pytest.raises(NonFiniteLoss, match=r"at step 5: 3 steps skipped, more than --max-skipped-steps 2") as err:
        train(_task(nan_loss_at=set(range(3, 8))), CPU, cfg, tmp_path)
    assert err.value.exit_code == EXIT_NONFINITE and "\n" not in str(err.value)
    assert _saved_checkpoints_are_finite(tmp_path) == [2, 4]


def test_weights_that_overflow_are_never_saved(tmp_path: Path) -> None:
    """A finite loss and finite gradients with an infinite learning rate (a broken schedule) make the
    weights infinite: the save after that step is refused and the message names the checkpoint before it."""
    with pytest.raises(NonFiniteLoss, match=r"non-finite values .*model\..* step 4.*ckpt-000000002\.pt") as err:
        train(_task(lr_at={3: float("inf")}), CPU, RuntimeConfig(progress=False, checkpoint_steps=2),
              tmp_path)
    assert err.value.exit_code == EXIT_NONFINITE
    assert _saved_checkpoints_are_finite(tmp_path) == [2]


def test_a_poisoned_checkpoint_is_refused_and_resume_falls_back(tmp_path: Path) -> None:
    """Checkpoints written by earlier versions may hold NaN weights: resuming from one would fail forever."""
    good = {"model": {"w": torch.ones(2)}, "step": 1}
    save_checkpoint(tmp_path, good, 1, keep=5)
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(tmp_path, {"model": {"w": torch.tensor([1.0, float("nan")])}, "step": 2}, 2, keep=5)
    assert [p.name for p in step_checkpoints(tmp_path / "checkpoints")] == ["ckpt-000000001.pt"]
    poisoned = tmp_path / "checkpoints" / "ckpt-000000002.pt"
    torch.save({"format_version": 2, "model": {"w": torch.tensor([1.0, float("nan")])}, "step": 2}, poisoned)
    with pytest.raises(CheckpointError, match=r"non-finite values \(model\.w\)"):
        load_checkpoint(poisoned)
    with pytest.warns(UserWarning, match="falling back to ckpt-000000001.pt"):
        path, ckpt = latest_valid_checkpoint(tmp_path)
    assert ckpt["step"] == 1


def test_a_skipped_step_leaves_the_batch_norm_statistics_as_they_were(tmp_path: Path) -> None:
    """An overflowing forward pass writes inf/NaN into BN running statistics before the loss is
    judged; a skipped step must undo that, or every later save is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))

    def step_fn(batch, step):
        inputs, targets = batch
        return nn.functional.cross_entropy(model(inputs * float("inf") if step == 1 else inputs), targets), {}

    task = TrainTask(stage="toy", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     batches=TensorBatches(x, y, 8), step_fn=step_fn, lr_fn=lambda s: 0.1, total_steps=8,
                     images_per_step=8, checkpoint_meta={})
    metrics = train(task, CPU, RuntimeConfig(progress=False, checkpoint_steps=2, on_nonfinite="skip"), tmp_path)
    assert metrics["step"] == 8 and metrics["skipped_steps"] == 1
    assert _all_finite(model.state_dict())
    assert _saved_checkpoints_are_finite(tmp_path)[-1] == 8
