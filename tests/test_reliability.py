"""Long runs and unsafe inputs: exact resume, kills, corrupt checkpoints, NaNs, bad data and settings."""
from __future__ import annotations

import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from simclrv2.cli import main
from simclrv2.config import RuntimeConfig
from simclrv2.engine.checkpoint import (CheckpointError, latest_valid_checkpoint, load_checkpoint,
                                        remove_stale_temp_files, save_checkpoint, step_checkpoints)
from simclrv2.engine.runtime import Runtime
from simclrv2.engine.trainer import (EXIT_INTERRUPTED, EXIT_SAVE_FAILED, INTERRUPTED_MARKER, NonFiniteLoss, SaveFailed,
                                     TrainTask, WorkerDied, train)
from simclrv2.data.batches import TensorBatches
from simclrv2.data.loader import FileLoader
from cli_checks import expect_one_line_error
from tiny_data import write_tiny_fashion_mnist

PROJECT = Path(__file__).resolve().parents[1]
RUN = ["--progress", "false", "--precision", "fp32", "--num-threads", "1", "--train-batch-size", "16",
       "--log-every-steps", "1"]
TINY = ["--resnet-depth", "18", "--width-multiplier", "0.125", *RUN]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=64, n_test=20)


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT)}
    return subprocess.Popen([sys.executable, "-m", "simclrv2", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pretrain_args(data_dir: Path, run_dir: Path, steps: int) -> list[str]:
    return ["pretrain", "--data-dir", str(data_dir), "--run-dir", str(run_dir), *TINY,
            "--train-steps", str(steps), "--checkpoint-steps", "2", "--keep-checkpoint-max", "10"]


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


# --------------------------------------------------------------------------- resume and signals

def test_sigkill_then_resume_is_bit_identical(data_dir: Path, tmp_path: Path) -> None:
    steps = 12
    reference = _cli(*_pretrain_args(data_dir, tmp_path / "reference", steps))
    interrupted_dir = tmp_path / "interrupted"
    victim = _cli(*_pretrain_args(data_dir, interrupted_dir, steps))
    _wait_for(lambda: len(step_checkpoints(interrupted_dir / "checkpoints")) >= 2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = max(int(p.stem.split("-")[1]) for p in step_checkpoints(interrupted_dir / "checkpoints"))
    assert killed_at < steps
    resumed = _cli(*_pretrain_args(data_dir, interrupted_dir, steps))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming pretrain" in out
    assert reference.wait(timeout=300) == 0
    a, b = _final_weights(tmp_path / "reference"), _final_weights(interrupted_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _cli(*_pretrain_args(data_dir, run_dir, 10_000))
    _wait_for(lambda: (run_dir / "metrics.jsonl").exists())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert saved["step"] >= 1 and saved["stage"] == "pretrain"
    assert f'"step": {saved["step"]}' in (run_dir / INTERRUPTED_MARKER).read_text()  # torchrun reports 75 as 1


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, {"model": {"w": torch.full((2,), float(step))}, "step": step}, step, keep=5)
    newest = step_checkpoints(tmp_path / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])
    with pytest.warns(UserWarning, match="falling back"):
        path, ckpt = latest_valid_checkpoint(tmp_path)
    assert ckpt["step"] == 2 and path.name == "ckpt-000000002.pt"


def test_checkpoint_rotation_keeps_last_k_and_last_link(tmp_path: Path) -> None:
    for step in range(1, 6):
        save_checkpoint(tmp_path, {"model": {}, "step": step}, step, keep=2)
    names = [p.name for p in step_checkpoints(tmp_path / "checkpoints")]
    assert names == ["ckpt-000000004.pt", "ckpt-000000005.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 5
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch's note on the raw pickle
def test_malicious_pickle_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "format_version": 1, "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="safely"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- non-finite losses

def _toy_task(stage: str, nan_at: int, run_dir: Path) -> tuple[TrainTask, nn.Module]:
    model = nn.Linear(4, 2)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))

    def step_fn(batch, step):
        inputs, targets = batch
        loss = nn.functional.cross_entropy(model(inputs), targets)
        return (loss * float("nan") if step == nan_at else loss), {}

    task = TrainTask(stage=stage, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     batches=TensorBatches(x, y, 8), step_fn=step_fn, lr_fn=lambda s: 0.1, total_steps=8,
                     images_per_step=8, checkpoint_meta={})
    return task, model


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    task, model = _toy_task("toy", nan_at=5, run_dir=tmp_path)
    runtime = RuntimeConfig(checkpoint_steps=2, progress=False)
    with pytest.raises(NonFiniteLoss, match="non-finite loss .* at step 5"):
        train(task, Runtime(torch.device("cpu"), None, False, 0, 1), runtime, tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nonfinite_loss_can_be_skipped_and_counted(tmp_path: Path) -> None:
    task, model = _toy_task("toy", nan_at=3, run_dir=tmp_path)
    runtime = RuntimeConfig(checkpoint_steps=100, progress=False, on_nonfinite="skip", log_every_steps=1)
    metrics = train(task, Runtime(torch.device("cpu"), None, False, 0, 1), runtime, tmp_path)
    assert metrics["skipped_steps"] == 1 and metrics["step"] == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skipped_steps_and_last_metrics_survive_a_resume(tmp_path: Path) -> None:
    rt = Runtime(torch.device("cpu"), None, False, 0, 1)
    task, _ = _toy_task("toy", nan_at=3, run_dir=tmp_path)
    first = RuntimeConfig(progress=False, on_nonfinite="skip", log_every_steps=1, max_steps=5)
    assert train(task, rt, first, tmp_path)["skipped_steps"] == 1
    task, _ = _toy_task("toy", nan_at=-1, run_dir=tmp_path)
    resumed = train(task, rt, RuntimeConfig(progress=False, log_every_steps=100), tmp_path)
    assert resumed["step"] == 8 and resumed["skipped_steps"] == 1
    finished = train(task, rt, RuntimeConfig(progress=False), tmp_path)  # nothing left to run
    assert finished["step"] == 8 and finished["loss"] == pytest.approx(resumed["loss"])


# --------------------------------------------------------------------------- full disks, dead workers, killed saves

def _no_temp_files(run_dir: Path) -> bool:
    return not any(p.name.startswith(".") for p in (run_dir / "checkpoints").iterdir())


def test_a_full_disk_during_a_save_stops_in_one_line_and_keeps_the_checkpoints(tmp_path: Path, monkeypatch) -> None:
    real_save = torch.save

    def disk_full_from_step_6(obj, handle):
        if obj["step"] < 6:
            return real_save(obj, handle)
        handle.write(b"PK\x03\x04 the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full_from_step_6)
    task, _ = _toy_task("toy", nan_at=-1, run_dir=tmp_path)
    with pytest.raises(SaveFailed) as err:
        train(task, Runtime(torch.device("cpu"), None, False, 0, 1),
              RuntimeConfig(checkpoint_steps=2, keep_checkpoint_max=2, progress=False), tmp_path)
    message = str(err.value)
    assert err.value.exit_code == EXIT_SAVE_FAILED and "\n" not in message
    assert "step 6 checkpoint" in message and "No space left on device" in message and "free disk space" in message
    assert "ckpt-000000004.pt, is kept" in message
    assert [p.name for p in step_checkpoints(tmp_path / "checkpoints")] == ["ckpt-000000002.pt", "ckpt-000000004.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 4
    assert _no_temp_files(tmp_path)


class _KilledAt(torch.utils.data.Dataset):
    """Samples whose loading kills the worker process at one index, as the OOM killer would."""

    def __init__(self, n: int, killed_at: int):
        self.n, self.killed_at = n, killed_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if index == self.killed_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.full((4,), float(index)), index % 2


def test_a_killed_dataloader_worker_stops_in_one_line_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    task, model = _toy_task("toy", nan_at=-1, run_dir=tmp_path)
    task.batches = FileLoader(_KilledAt(64, killed_at=40), batch_size=8, shuffle=False, num_workers=1,
                              persistent_workers=False, pin_memory=False)
    with pytest.raises(WorkerDied) as err:
        train(task, Runtime(torch.device("cpu"), None, False, 0, 1), RuntimeConfig(checkpoint_steps=1, progress=False),
              tmp_path)
    message = str(err.value)
    assert message.startswith("a DataLoader worker died (DataLoader worker (pid") and "\n" not in message
    assert "lower --num-workers" in message and "rerun the same command to resume" in message
    kept = step_checkpoints(tmp_path / "checkpoints")
    assert kept and f"{kept[-1].name}, is kept" in message and load_checkpoint(kept[-1])["step"] <= 5
    assert _no_temp_files(tmp_path)


def test_temp_files_of_killed_saves_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    stale = [ckpt_dir / f".ckpt-000000004.pt.tmp-{dead.pid}", ckpt_dir / f".last.pt.tmp-{dead.pid}"]
    live = ckpt_dir / f".ckpt-000000006.pt.tmp-{os.getppid()}"  # a writer still at work
    for path in (*stale, live):
        path.write_bytes(b"partial")
    (ckpt_dir / "notes.tmp-1").write_text("not ours")  # only our own hidden temp names are touched
    assert sorted(remove_stale_temp_files(ckpt_dir)) == sorted(stale)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted([live.name, "notes.tmp-1"])
    stale[0].write_bytes(b"partial")  # a run starting in the folder cleans up too
    task, _ = _toy_task("toy", nan_at=-1, run_dir=tmp_path)
    train(task, Runtime(torch.device("cpu"), None, False, 0, 1), RuntimeConfig(progress=False, max_steps=1), tmp_path)
    assert not stale[0].exists() and live.exists()


# --------------------------------------------------------------------------- bad input: one line, exit 2

@pytest.mark.parametrize("flags, fragment", [
    (["--ft-proj-selector", "5"], "--ft-proj-selector"),
    (["--resnet-depth", "77"], "--resnet-depth"),
    (["--train-batch-size", "0"], "--train-batch-size"),
    (["--temperature", "0"], "--temperature"),
    (["--width-multiplier", "-1"], "--width-multiplier"),
    (["--learning-rate-scaling", "cubic"], "--learning-rate-scaling"),
    (["--train-batch-size", "many"], "--train-batch-size"),
    (["--on-nonfinite", "explode"], "--on-nonfinite"),
    (["--train-steps", "-5"], "--train-steps"),
    (["--augmentation", "kornia"], "--augmentation"),
    (["--train-batch-size", "128"], "lower --train-batch-size"),  # 64 training images
])
def test_bad_settings_fail_before_training(capsys, data_dir: Path, tmp_path: Path, flags, fragment) -> None:
    expect_one_line_error(capsys, ["pretrain", "--data-dir", data_dir, "--run-dir", tmp_path / "r", *TINY, *flags], fragment)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_missing_checkpoint_and_wrong_architecture(capsys, data_dir: Path, tmp_path: Path) -> None:
    expect_one_line_error(capsys, ["finetune", "--checkpoint", tmp_path / "nope.pt", "--data-dir", data_dir], "does not exist")
    bogus = tmp_path / "bogus.pt"
    torch.save({"format_version": 1, "model": {"encoder.stem.conv1.weight": torch.zeros(1)},
                "model_config": {"depth": 18, "width_multiplier": 0.125, "sk_ratio": 0.0, "cifar_stem": True,
                                 "num_proj_layers": 3, "proj_out_dim": 128, "ft_proj_selector": 1,
                                 "num_classes": None, "mode": "pretrain"}}, bogus)
    expect_one_line_error(capsys, ["finetune", "--checkpoint", bogus, "--data-dir", data_dir, *TINY], "does not fit")


def test_missing_data_folder(capsys, tmp_path: Path) -> None:
    expect_one_line_error(capsys, ["pretrain", "--data-dir", tmp_path / "empty", *TINY],
                  "apt-get install dataset-fashion-mnist", "--data-dir")


def test_corrupt_data_file(capsys, data_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in data_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    expect_one_line_error(capsys, ["pretrain", "--data-dir", broken, *TINY], "train-images-idx3-ubyte.gz")


def test_label_file_with_unknown_ids(capsys, data_dir: Path, tmp_path: Path) -> None:
    ids = tmp_path / "1percent.txt"
    ids.write_text("0\n5\nn01440764_10026.JPEG\n")
    fake = tmp_path / "pre.pt"
    expect_one_line_error(capsys, ["linear-eval", "--checkpoint", fake, "--data-dir", data_dir, *RUN], "does not exist")
    run = tmp_path / "pre"
    assert main(["pretrain", "--data-dir", str(data_dir), "--run-dir", str(run), *TINY, "--train-steps", "1"]) == 0
    capsys.readouterr()
    expect_one_line_error(capsys, ["linear-eval", "--checkpoint", run, "--data-dir", data_dir, *RUN,
                           "--label-file", ids], "n01440764_10026.JPEG")


def _image_folder(root: Path, corrupt: bool, empty_class: bool) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for c in range(2):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (40, 36), (60 * c + 10 * i, 20, 200 - 30 * c)).save(folder / f"{i}.png")
    if corrupt:
        (root / "train" / "class_1" / "3.png").write_bytes(b"\x89PNG broken")
    if empty_class:
        (root / "train" / "class_empty").mkdir()
    return root


def test_corrupt_image_inside_workers_and_skip(capsys, tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs", corrupt=True, empty_class=False)
    common = ["pretrain", "--dataset", "folder", "--data-dir", root, "--image-size", "32", *TINY,
              "--train-batch-size", "4", "--train-steps", "4", "--num-workers", "1"]
    expect_one_line_error(capsys, [*common, "--run-dir", tmp_path / "a"], "3.png", "--skip-bad-images")
    assert main([*map(str, common), "--run-dir", str(tmp_path / "b"), "--skip-bad-images", "true"]) == 0
    from simclrv2.engine.logging import read_metrics

    assert read_metrics(tmp_path / "b", "step")[-1]["skipped_images"] >= 1


def test_empty_class_folder(capsys, tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs", corrupt=False, empty_class=True)
    expect_one_line_error(capsys, ["pretrain", "--dataset", "folder", "--data-dir", root, *TINY], "class_empty")


def test_architecture_flag_that_contradicts_the_checkpoint(capsys, data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "pre"
    assert main(["pretrain", "--data-dir", str(data_dir), "--run-dir", str(run), *TINY, "--train-steps", "1"]) == 0
    capsys.readouterr()
    expect_one_line_error(capsys, ["finetune", "--checkpoint", run, "--data-dir", data_dir, *TINY, "--resnet-depth", "50"],
                  "--resnet-depth 50 differs from the checkpoint")
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_a_folder_written_with_other_settings(capsys, data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "pre"
    first = _pretrain_args(data_dir, run, steps=2)
    assert main(first) == 0
    capsys.readouterr()
    def folder_state():
        return (sorted(p.name for p in (run / "checkpoints").iterdir()), (run / "config.json").read_text(),
                len(list((run / "tensorboard").glob("events.*"))))

    before = folder_state()
    expect_one_line_error(capsys, [*first, "--resume", "false"], "already holds checkpoints", "--resume true")
    expect_one_line_error(capsys, [*first, "--train-steps", "4", "--train-batch-size", "8"], "--train-steps 2 -> 4",
                  "--train-batch-size 16 -> 8")
    expect_one_line_error(capsys, [*first, "--subset", "32"], "--subset none -> 32")
    expect_one_line_error(capsys, [*first, "--use-memory", "true"], "--use-memory false -> true")
    expect_one_line_error(capsys, ["finetune", "--data-dir", data_dir, "--run-dir", run, *TINY, "--train-steps", "4"],
                  "holds a pretrain run")
    assert folder_state() == before  # a refused run leaves the folder as it was


def test_bad_config_files(capsys, data_dir: Path, tmp_path: Path) -> None:
    files = {"bad.yaml": "model: [unclosed", "latin1.json": "{\"x\": \"\xe9\"}", "data.json": '{"data": "x"}'}
    expected = {"bad.yaml": "not valid YAML", "latin1.json": "not UTF-8", "data.json": "'data' must be a mapping"}
    for name, text in files.items():
        path = tmp_path / name
        path.write_bytes(text.encode("latin-1"))
        expect_one_line_error(capsys, ["pretrain", "--config", path, "--data-dir", data_dir, *TINY], expected[name])
