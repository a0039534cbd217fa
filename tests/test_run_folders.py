"""One owner per run folder (issue #20, classes 2, 3, 4 and 7): the lock, the folder's command,
settings and inputs compared on resume, stale pipeline stages, outputs never written through
links, and class names checked where labels meet a classifier."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simclrv2.cli import main
from simclrv2.engine.checkpoint import load_checkpoint, step_checkpoints
from simclrv2.engine.run_folder import LOCK_FILE, FolderLock
from cli_checks import expect_one_line_error
from tiny_data import write_tiny_fashion_mnist

PROJECT = Path(__file__).resolve().parents[1]
RUN = ["--progress", "false", "--precision", "fp32", "--num-threads", "1"]
TINY = ["--resnet-depth", "18", "--width-multiplier", "0.125", *RUN, "--log-every-steps", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=64, n_test=20)


def _pretrain(data_dir: Path, run_dir: Path, *flags: str) -> list[str]:
    return ["pretrain", "--data-dir", data_dir, "--run-dir", run_dir, *TINY, "--train-batch-size", "16",
            "--train-steps", "4", "--checkpoint-steps", "1", *flags]


def _run(*args) -> None:
    assert main([str(a) for a in args]) == 0


def _files(run_dir: Path) -> dict[str, bytes]:
    """Every file under ``run_dir`` but the lock file (its text names the latest holder)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def _copy_run(source: Path, run_dir: Path, leave_out: tuple = ()) -> Path:
    """A copy of the run folder ``source`` at ``run_dir`` (without the files named in ``leave_out``)."""
    for name, content in _files(source).items():
        if name not in leave_out:
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / name).write_bytes(content)
    return run_dir


@pytest.fixture(scope="module")
def pretrained(data_dir: Path, tmp_path_factory) -> Path:
    """A pretraining run stopped at step 1 of 4 (its linear head makes it a classifier too)."""
    run_dir = tmp_path_factory.mktemp("runs") / "pre"
    _run(*_pretrain(data_dir, run_dir, "--max-steps", "1"))
    return run_dir


# --------------------------------------------------------------------------- the lock (class 3)


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that holds ``run_dir``'s lock until killed."""
    code = ("import sys, time; from simclrv2.engine.run_folder import FolderLock; "
            "FolderLock(sys.argv[1]); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(PROJECT)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_while_the_first_holds_the_folder(capsys, data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = _hold_lock(run_dir)
    try:
        err = expect_one_line_error(capsys, _pretrain(data_dir, run_dir), f"--run-dir {run_dir} is in use by another run",
                                    f"pid {holder.pid} on ", "wait for it to end")
        assert f": -c {run_dir})" in err  # the holder's command line (sys.argv of python -c)
        assert _files(run_dir) == {}
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    FolderLock(run_dir).release()  # the OS dropped the killed holder's lock: none is stale


# --------------------------------------------------------------------------- one command per folder (class 7)


def test_evaluate_into_a_training_folder_is_refused_and_changes_nothing(capsys, data_dir: Path,
                                                                        pretrained: Path) -> None:
    before = _files(pretrained)
    expect_one_line_error(capsys, ["evaluate", "--checkpoint", pretrained, "--data-dir", data_dir, "--run-dir",
                                   pretrained, *RUN], f"--run-dir {pretrained} holds a pretrain run",
                          "evaluate writes only into its own folder")
    assert _files(pretrained) == before


def test_a_folder_of_other_files_is_refused(capsys, data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    expect_one_line_error(capsys, _pretrain(data_dir, tmp_path), "holds files (notes.txt) but no run.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_outputs_replace_links_instead_of_writing_through_them(data_dir: Path, pretrained: Path,
                                                               tmp_path: Path) -> None:
    run_dir = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", pretrained, "--data-dir", data_dir, "--run-dir", run_dir, *RUN]
    _run(*args)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("config.json", "eval.json"):
        target = outside / name
        target.write_text((run_dir / name).read_text() + "\n")  # the same settings, other bytes
        (run_dir / name).unlink()
        (run_dir / name).symlink_to(target)
    kept = _files(outside)
    _run(*args)
    assert _files(outside) == kept
    for name in ("config.json", "eval.json"):
        assert not (run_dir / name).is_symlink() and json.loads((run_dir / name).read_text())


# --------------------------------------------------------------------------- resume compares settings (class 2)


def test_resume_with_other_settings_is_refused_naming_each(capsys, data_dir: Path, pretrained: Path,
                                                           tmp_path: Path) -> None:
    run_dir = _copy_run(pretrained, tmp_path / "pre")
    before = _files(run_dir)
    expect_one_line_error(capsys, _pretrain(data_dir, run_dir, "--temperature", "0.5", "--seed", "1",
                                            "--color-jitter-strength", "0.3"),
                          "(saved -> now: --color-jitter-strength 0.5 -> 0.3, --seed 0 -> 1, --temperature 0.2 -> 0.5)")
    assert _files(run_dir) == before
    # What may change on resume: the stop, the loader, logging, checkpoints kept, the device.
    _run(*_pretrain(data_dir, run_dir, "--max-steps", "2", "--num-workers", "0", "--log-every-steps", "2",
                    "--keep-checkpoint-max", "5", "--device", "cpu", "--eval-batch-size", "8"))
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 2
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["temperature"] == 0.2 and saved["runtime"]["max_steps"] == 2


def test_a_run_stopped_before_its_first_checkpoint_takes_corrected_settings(capsys, data_dir: Path,
                                                                           tmp_path: Path) -> None:
    """Nothing was kept to resume, so the fix the error suggests (a lower learning rate) is accepted."""
    run_dir = tmp_path / "pre"
    assert main([str(a) for a in _pretrain(data_dir, run_dir, "--learning-rate", "1e30", "--checkpoint-steps", "100")]) == 3
    assert "no checkpoint was written yet" in capsys.readouterr().err
    _run(*_pretrain(data_dir, run_dir, "--max-steps", "1"))
    assert json.loads((run_dir / "config.json").read_text())["optim"]["learning_rate"] != 1e30


def test_a_pipeline_refused_before_any_stage_ran_takes_corrected_settings(capsys, data_dir: Path,
                                                                          tmp_path: Path) -> None:
    run_dir = tmp_path / "pipe"
    args = ["pipeline", "--run-dir", run_dir, *RUN, "--pretrain.resnet-depth", "18", "--pretrain.width-multiplier",
            "0.125", "--label-fractions", "0.5", "--labels-per-class", "", "--max-steps", "1"]
    expect_one_line_error(capsys, [*args, "--data-dir", tmp_path / "missing"], "not found")
    _run(*args, "--data-dir", data_dir, "--pretrain.train-batch-size", "16", "--distill.train-batch-size", "16",
         "--pretrain.train-steps", "1", "--finetune.train-steps", "1", "--baseline.train-steps", "1",
         "--distill.train-steps", "1", "--linear-eval.train-steps", "1")


def test_skipping_bad_images_may_be_turned_on_when_resuming(data_dir: Path, pretrained: Path, tmp_path: Path) -> None:
    """A decode error mid-epoch advises --skip-bad-images: resuming with it is allowed."""
    run_dir = _copy_run(pretrained, tmp_path / "pre")
    _run(*_pretrain(data_dir, run_dir, "--max-steps", "2", "--skip-bad-images"))
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 2


def test_a_training_run_of_an_earlier_version_is_resumed_but_not_reused(capsys, data_dir: Path, pretrained: Path,
                                                                         tmp_path: Path) -> None:
    """A folder without ``run.json`` (written before run records) still resumes, with its settings."""
    run_dir = _copy_run(pretrained, tmp_path / "pre", leave_out=("run.json",))
    expect_one_line_error(capsys, ["evaluate", "--checkpoint", pretrained, "--data-dir", data_dir, "--run-dir",
                                   run_dir, *RUN], "holds files (checkpoints, config.json, metrics.jsonl) but no run.json")
    expect_one_line_error(capsys, _pretrain(data_dir, run_dir, "--seed", "3"), "--seed 0 -> 3")
    _run(*_pretrain(data_dir, run_dir, "--max-steps", "2"))
    assert json.loads((run_dir / "run.json").read_text())["command"] == "pretrain"
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 2


def _finetune(data_dir: Path, checkpoint, run_dir: Path, *flags: str) -> list:
    return ["finetune", "--checkpoint", checkpoint, "--data-dir", data_dir, "--run-dir", run_dir, *RUN,
            "--labels-per-class", "2", "--train-batch-size", "10", "--train-steps", "2", *flags]


def test_finetune_from_another_checkpoint_is_refused(capsys, data_dir: Path, pretrained: Path,
                                                     tmp_path: Path) -> None:
    pre = _copy_run(pretrained, tmp_path / "pre")
    first = step_checkpoints(pre / "checkpoints")[-1]
    ft = tmp_path / "ft"
    _run(*_finetune(data_dir, pre, ft, "--max-steps", "1"))
    _run(*_pretrain(data_dir, pre, "--max-steps", "2"))  # the pretraining went on: the folder's newest moved
    before = _files(ft)
    expect_one_line_error(capsys, _finetune(data_dir, pre, ft), f"--checkpoint {first.resolve()} (step 1, sha256 ",
                          "(step 2, sha256 ")
    assert _files(ft) == before
    _run(*_finetune(data_dir, first, ft))  # the same file, named directly: the same input
    assert load_checkpoint(ft / "checkpoints" / "last.pt")["step"] == 2


# --------------------------------------------------------------------------- the pipeline's stages


def test_pipeline_reruns_stages_whose_inputs_changed_and_refuses_other_settings(capsys, data_dir: Path,
                                                                                 tmp_path: Path) -> None:
    run_dir = tmp_path / "pipe"
    args = ["pipeline", "--data-dir", data_dir, "--run-dir", run_dir, *RUN, "--pretrain.resnet-depth", "18",
            "--pretrain.width-multiplier", "0.125", "--pretrain.train-batch-size", "16",
            "--distill.train-batch-size", "16", "--label-fractions", "0.5", "--labels-per-class", "",
            "--pretrain.train-steps", "2", "--finetune.train-steps", "1", "--baseline.train-steps", "1",
            "--distill.train-steps", "1", "--linear-eval.train-steps", "1"]
    _run(*args, "--max-steps", "1")
    stage_dir = run_dir / "seed-0" / "labels-0.5"
    old = {name: _files(stage_dir / name) for name in ("linear_eval", "finetune", "distill", "baseline")}
    capsys.readouterr()
    _run(*args)  # pretraining goes on to step 2: what was trained from its step 1 is stale
    out = capsys.readouterr().out
    for name in ("linear_eval", "finetune", "distill"):
        assert f"{stage_dir / name} started from other inputs" in out
        assert _files(stage_dir / f"{name}.stale-1") == old[name]  # kept as it was
        record = json.loads((stage_dir / name / "run.json").read_text())
        assert record["inputs"]["checkpoint"]["step"] == (1 if name == "distill" else 2)
    assert not (stage_dir / "baseline.stale-1").exists()  # it has no inputs: resumed
    assert json.loads((run_dir / "report.json").read_text())["per_seed"]["0"]["pretrain"]["step"] == 2
    _run(*args)  # nothing changed: every stage resumes at its end, none is stale
    assert "started from other inputs" not in capsys.readouterr().out
    assert not list(stage_dir.glob("*.stale-2"))
    before = _files(run_dir)
    expect_one_line_error(capsys, [*args, "--pretrain.temperature", "0.5"], f"--run-dir {run_dir} holds a pipeline run",
                          "--pretrain.temperature 0.2 -> 0.5")
    assert _files(run_dir) == before


# --------------------------------------------------------------------------- classes (class 4)


def _with_classes(checkpoint: Path, classes: list, out: Path) -> Path:
    ckpt = load_checkpoint(checkpoint)
    torch.save({**ckpt, "classes": classes}, out)
    return out


def test_evaluate_refuses_a_checkpoint_of_other_classes(capsys, data_dir: Path, pretrained: Path,
                                                        tmp_path: Path) -> None:
    classes = load_checkpoint(pretrained / "checkpoints" / "last.pt")["classes"]
    renamed = _with_classes(pretrained / "checkpoints" / "last.pt", [*classes[:-1], "sock"], tmp_path / "a.pt")
    expect_one_line_error(capsys, ["evaluate", "--checkpoint", renamed, "--data-dir", data_dir, *RUN],
                          "trained on other classes than the data", "only in the checkpoint: sock",
                          f"only in the data: {classes[-1]}")
    swapped = _with_classes(pretrained / "checkpoints" / "last.pt", [classes[1], classes[0], *classes[2:]],
                            tmp_path / "b.pt")
    expect_one_line_error(capsys, ["evaluate", "--checkpoint", swapped, "--data-dir", data_dir, *RUN],
                          f"the same classes in another order: 0: {classes[1]} -> {classes[0]}")


def test_distill_refuses_a_teacher_of_other_classes(capsys, data_dir: Path, pretrained: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    _run(*_finetune(data_dir, pretrained, teacher, "--max-steps", "1"))
    last = teacher / "checkpoints" / "last.pt"
    classes = load_checkpoint(last)["classes"]
    renamed = _with_classes(last, ["boot", *classes[1:]], tmp_path / "t.pt")
    expect_one_line_error(capsys, ["distill", "--checkpoint", renamed, "--data-dir", data_dir, "--run-dir",
                                   tmp_path / "student", *RUN, "--train-batch-size", "16", "--train-steps", "1"],
                          "only in the checkpoint: boot")
    assert not (tmp_path / "student").exists()
