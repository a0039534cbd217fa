"""Resuming a run folder that does not fit: changed settings, unreadable checkpoints, the metrics
an interrupted attempt logged after its last checkpoint, and what a non-finite stop promises."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from simclrv2.cli import main
from simclrv2.config import RuntimeConfig
from simclrv2.data.batches import TensorBatches
from simclrv2.engine.checkpoint import (CheckpointError, capture_rng, latest_valid_checkpoint, load_checkpoint,
                                        resolve_checkpoint, restore_rng, save_checkpoint, step_checkpoints)
from simclrv2.engine.logging import read_metrics
from simclrv2.engine.runtime import Runtime
from simclrv2.engine.trainer import NonFiniteLoss, TrainTask, train
from cli_checks import expect_one_line_error
from tiny_data import write_tiny_fashion_mnist

CPU = Runtime(torch.device("cpu"), None, False, 0, 1)
TINY = ["--resnet-depth", "18", "--width-multiplier", "0.125", "--progress", "false", "--precision", "fp32",
        "--num-threads", "1", "--train-batch-size", "16", "--log-every-steps", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=64, n_test=20)


def _pretrain(data_dir: Path, run_dir: Path, *flags: str) -> list[str]:
    return ["pretrain", "--data-dir", str(data_dir), "--run-dir", str(run_dir), *TINY, "--train-steps", "4",
            "--checkpoint-steps", "1", *flags]


@pytest.fixture(scope="module")
def pretrained(data_dir: Path, tmp_path_factory) -> Path:
    """A default-settings run stopped at step 2, to be resumed."""
    run_dir = tmp_path_factory.mktemp("runs") / "pre"
    assert main(_pretrain(data_dir, run_dir, "--max-steps", "2")) == 0
    return run_dir


def _folder_state(run_dir: Path) -> tuple:
    return (sorted(p.name for p in (run_dir / "checkpoints").iterdir()), (run_dir / "config.json").read_text(),
            (run_dir / "metrics.jsonl").read_text())


# --------------------------------------------------------------------------- changed model or optimiser

@pytest.mark.parametrize("flags, change", [
    (["--resnet-depth", "34"], "--resnet-depth 18 -> 34"),
    (["--width-multiplier", "0.25"], "--width-multiplier 0.125 -> 0.25"),
    (["--proj-out-dim", "64"], "--proj-out-dim 128 -> 64"),
    (["--optimizer", "adam"], "--optimizer lars -> adam"),
    (["--optimizer", "momentum"], "--optimizer lars -> momentum"),
])
def test_resume_with_another_model_or_optimiser_is_refused_in_one_line(capsys, data_dir: Path, pretrained: Path,
                                                                        flags, change) -> None:
    before = _folder_state(pretrained)
    expect_one_line_error(capsys, _pretrain(data_dir, pretrained, *flags), str(pretrained),
                          f"made with other settings (saved -> now: {change})", "another --run-dir")
    assert _folder_state(pretrained) == before


def _toy_task(model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int = 8, nan_at: int = -1,
              end_of_epoch=None) -> TrainTask:
    """``nn.Linear`` on 32 random points, 8 per step (4 steps per epoch)."""
    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 2

    def step_fn(batch, step):
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        return (loss * float("nan") if step == nan_at else loss), {}

    return TrainTask(stage="toy", model=model, optimizer=optimizer, batches=TensorBatches(x, y, 8), step_fn=step_fn,
                     lr_fn=lambda s: 0.1, total_steps=total_steps, images_per_step=8, checkpoint_meta={},
                     end_of_epoch=end_of_epoch)


def test_state_that_no_recorded_setting_explains_is_refused_in_one_line(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    train(_toy_task(model, torch.optim.SGD(model.parameters(), lr=0.1)), CPU,
          RuntimeConfig(progress=False, max_steps=2), tmp_path)
    wider = nn.Linear(4, 3)
    with pytest.raises(CheckpointError, match=r"different model \(its saved state does not fit"):
        train(_toy_task(wider, torch.optim.SGD(wider.parameters(), lr=0.1)), CPU, RuntimeConfig(progress=False),
              tmp_path)
    model = nn.Linear(4, 2)  # the bias frozen: the optimiser's parameter groups change
    with pytest.raises(CheckpointError, match=r"different optimiser \(its saved state does not fit") as err:
        train(_toy_task(model, torch.optim.SGD([model.weight], lr=0.1)), CPU, RuntimeConfig(progress=False), tmp_path)
    assert "\n" not in str(err.value) and "another --run-dir" in str(err.value)


# --------------------------------------------------------------------------- unreadable checkpoints

def _three_checkpoints(run_dir: Path) -> list[Path]:
    for step in (1, 2, 3):
        save_checkpoint(run_dir, {"model": {"w": torch.full((64,), float(step))}, "step": step}, step, keep=5)
    return step_checkpoints(run_dir / "checkpoints")


def _spoil(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "text": b"hello, not a checkpoint\n", "random": os.urandom(2048),
                      "truncated": data[: len(data) // 2]}[how])


@pytest.mark.parametrize("how, reason", [("empty", "the file is empty"), ("text", "not a PyTorch zip archive"),
                                         ("random", "not a PyTorch zip archive"),
                                         ("truncated", "failed reading zip archive")])
def test_unreadable_checkpoint_is_named_in_one_short_line(tmp_path: Path, how: str, reason: str) -> None:
    newest = _three_checkpoints(tmp_path)[-1]
    _spoil(newest, how)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(newest)
    message = str(err.value)
    assert message.startswith(f"checkpoint {newest} is unreadable (truncated, corrupt or not a simclrv2 checkpoint: ")
    assert message.endswith("); delete it or pass another ckpt-*.pt")
    assert reason in message and "weights_only" not in message and "\n" not in message
    with pytest.warns(UserWarning) as caught:
        path, ckpt = latest_valid_checkpoint(tmp_path)
    assert ckpt["step"] == 2 and path.name == "ckpt-000000002.pt"
    assert [str(w.message) for w in caught] == [message.removesuffix("; delete it or pass another ckpt-*.pt")
                                                + "; skipping it and falling back to ckpt-000000002.pt"]


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_unsafe_content_is_told_apart_from_corruption(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "format_version": 2, "payload": _Payload()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "safely" in str(err.value) and "system" in str(err.value) and "unreadable" not in str(err.value)
    assert "weights_only" not in str(err.value)


def test_a_folder_of_only_unreadable_checkpoints_is_refused(tmp_path: Path) -> None:
    for path in _three_checkpoints(tmp_path):
        _spoil(path, "truncated")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="delete them to start the run again, or use another --run-dir") \
                as err:
            latest_valid_checkpoint(tmp_path)
        with pytest.raises(CheckpointError, match="pass --checkpoint another run folder"):
            resolve_checkpoint(str(tmp_path))
    assert f"no checkpoint in {tmp_path / 'checkpoints'} can be read (3 tried" in str(err.value)
    assert not [w for w in caught if "falling back" in str(w.message)]
    model = nn.Linear(4, 2)  # and the training loop does not start over at step 0
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        train(_toy_task(model, torch.optim.SGD(model.parameters(), lr=0.1)), CPU, RuntimeConfig(progress=False),
              tmp_path)
    assert len(step_checkpoints(tmp_path / "checkpoints")) == 3 and not (tmp_path / "metrics.jsonl").exists()


def test_only_unreadable_checkpoints_stop_the_cli_in_one_line(capsys, data_dir: Path, pretrained: Path,
                                                              tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(pretrained, run)
    for path in step_checkpoints(run / "checkpoints"):
        _spoil(path, "empty")
    before = _folder_state(run)
    expect_one_line_error(capsys, _pretrain(data_dir, run), f"no checkpoint in {run / 'checkpoints'} can be read",
                    "the file is empty", "delete them")
    assert _folder_state(run) == before


# --------------------------------------------------------------------------- metrics after a resume

@pytest.mark.parametrize("resume_from", [4, 6])
def test_metrics_of_steps_after_the_resumed_checkpoint_are_dropped(tmp_path: Path, resume_from: int) -> None:
    def run(max_steps: int) -> None:
        model = nn.Linear(4, 2)
        task = _toy_task(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=12,
                         end_of_epoch=lambda epoch: {"val": float(epoch)})
        train(task, CPU, RuntimeConfig(progress=False, log_every_steps=1, checkpoint_steps=3, keep_checkpoint_max=10,
                                       max_steps=max_steps), tmp_path)

    run(10)  # checkpoints at 3, 4 (epoch end), 6, 8 (epoch end), 9 and 10
    for path in step_checkpoints(tmp_path / "checkpoints"):  # as if killed after logging step 10 ...
        if int(path.stem.split("-")[1]) > resume_from:  # ... but before the later checkpoints were written
            path.unlink()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "step", "st')  # and in the middle of a line
    run(12)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 13))
    assert [(r["step"], r["val"]) for r in records if r["kind"] == "epoch"] == [(4, 1.0), (8, 2.0), (12, 3.0)]
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(records) and all(json.loads(line) for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "metrics.jsonl", "tensorboard"]


# --------------------------------------------------------------------------- non-finite stop

@pytest.mark.parametrize("nan_at, promise", [
    (1, "no checkpoint was written yet, so a rerun starts from step 0"),
    (5, "the last good checkpoint, ckpt-000000004.pt, is kept in"),
])
def test_nonfinite_stop_promises_only_a_checkpoint_that_exists(tmp_path: Path, nan_at: int, promise: str) -> None:
    model = nn.Linear(4, 2)
    with pytest.raises(NonFiniteLoss) as err:
        train(_toy_task(model, torch.optim.SGD(model.parameters(), lr=0.1), nan_at=nan_at), CPU,
              RuntimeConfig(progress=False, checkpoint_steps=2), tmp_path)
    assert promise in str(err.value)
    assert ("last good checkpoint" in str(err.value)) == (tmp_path / "checkpoints").is_dir()


class _FakeCuda:
    """The torch.cuda functions that capture_rng / restore_rng use, on a CPU-only machine."""

    def __init__(self, monkeypatch, current: int, initialized: bool = True):
        self.set_to: list[torch.Tensor] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        def state_of(device="cuda"):  # "cuda" is the current GPU; the state's bytes name the GPU
            index = torch.device(device).index
            return torch.full((16,), current if index is None else index, dtype=torch.uint8)
        monkeypatch.setattr(torch.cuda, "get_rng_state", state_of)
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": self.set_to.append(state))


def test_cuda_random_state_is_this_process_gpu_only(monkeypatch):
    _FakeCuda(monkeypatch, current=3)
    assert torch.equal(capture_rng()["cuda"], torch.full((16,), 3, dtype=torch.uint8))
    _FakeCuda(monkeypatch, current=0, initialized=False)  # a CPU run on a GPU machine: no CUDA context made
    assert "cuda" not in capture_rng()


def test_cuda_random_state_restores_on_fewer_gpus_than_were_visible(monkeypatch):
    cpu_state = capture_rng()
    per_gpu = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]  # older checkpoints: every visible GPU
    fake = _FakeCuda(monkeypatch, current=1)
    restore_rng({**cpu_state, "cuda": per_gpu})
    restore_rng({**cpu_state, "cuda": per_gpu[5]})
    assert [int(s[0]) for s in fake.set_to] == [1, 5]
    fake = _FakeCuda(monkeypatch, current=3)
    restore_rng({**cpu_state, "cuda": per_gpu[:2]})  # saved with 2 GPUs visible, resumed on GPU 3: skipped
    assert fake.set_to == []
    fake = _FakeCuda(monkeypatch, current=0, initialized=False)  # a CPU run on a GPU machine
    restore_rng({**cpu_state, "cuda": per_gpu})
    restore_rng({**cpu_state, "cuda": per_gpu[0]})
    assert fake.set_to == []


def test_augmentation_generator_from_another_device_type_is_reseeded_with_a_warning():
    from simclrv2.engine.trainer import GeneratorState

    source = torch.Generator().manual_seed(3)
    torch.rand(5, generator=source)
    same = GeneratorState(torch.Generator())
    same.load_state_dict(GeneratorState(source).state_dict())
    assert torch.equal(torch.rand(4, generator=same.generator), torch.rand(4, generator=source))

    def draws_after_loading(saved: torch.Tensor) -> torch.Tensor:
        target = GeneratorState(torch.Generator())
        with pytest.warns(UserWarning, match=r"another device type than this run's cpu \(GPU runs drew .*\); it is reseeded"):
            target.load_state_dict({"state": saved})
        return torch.rand(4, generator=target.generator)
    cuda_like = torch.arange(16, dtype=torch.uint8)  # a CUDA generator's state is 16 bytes (seed, offset)
    assert torch.equal(draws_after_loading(cuda_like), draws_after_loading(cuda_like.clone()))
    assert not torch.equal(draws_after_loading(cuda_like), draws_after_loading(cuda_like.flip(0)))


def test_nonfinite_and_stop_flags_read_from_scalar_or_one_element_losses():
    from simclrv2.engine.trainer import _agree

    rt = Runtime(torch.device("cpu"), None, False, 0, 1)
    assert _agree(torch.tensor(float("nan")), [], False, rt) == (True, False)
    assert _agree(torch.tensor([2.5]), [], True, rt) == (False, True)  # shape (1,), as some losses come
    assert _agree(torch.tensor([float("inf")], requires_grad=True), [], True, rt) == (True, True)
    assert _agree(torch.tensor(2.5), [torch.ones(3), torch.tensor([0.0, float("-inf")])], False, rt) == (True, False)
    assert _agree(torch.tensor(2.5), [torch.ones(3), torch.full((2,), 3e38)], False, rt) == (False, False)
