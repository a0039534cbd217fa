"""End-to-end runs of every stage on tiny generated data (issue: the three stages).

One pretraining run is shared by the module; each later stage starts from it through the
command-line interface, exactly as a user would.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import simclrv2
from simclrv2.cli import main
from simclrv2.engine.checkpoint import load_checkpoint
from simclrv2.engine.logging import read_metrics
from tiny_data import write_tiny_fashion_mnist

TINY_MODEL = ["--resnet-depth", "18", "--width-multiplier", "0.125"]
FAST = ["--progress", "false", "--precision", "fp32", "--num-threads", "1", "--eval-batch-size", "64"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


def _run(*args: str) -> None:
    assert main([str(a) for a in args]) == 0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def pretrained(data_dir: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "pretrain"
    _run("pretrain", "--data-dir", data_dir, "--run-dir", run_dir, *TINY_MODEL, *FAST,
         "--train-batch-size", "32", "--train-epochs", "20", "--warmup-epochs", "1", "--learning-rate", "0.3",
         "--color-jitter-strength", "0.5", "--checkpoint-steps", "10", "--log-every-steps", "1")
    return run_dir


def test_pretrain_writes_outputs_and_loss_falls(pretrained: Path) -> None:
    for name in ("config.json", "metrics.jsonl", "checkpoints/last.pt"):
        assert (pretrained / name).exists(), name
    assert any((pretrained / "tensorboard").iterdir())
    config = json.loads((pretrained / "config.json").read_text())
    assert config["model"]["resnet_depth"] == 18 and config["optim"]["train_batch_size"] == 32
    steps = read_metrics(pretrained, "step")
    assert len(steps) == 3 * 20 + 1  # 96 images / 32 per step for 20 epochs, plus the official +1 step
    losses = [r["contrast_loss"] for r in steps]
    assert _mean(losses[-10:]) < _mean(losses[:10]) - 0.5
    epochs = read_metrics(pretrained, "epoch")
    assert [r["epoch"] for r in epochs] == list(range(1, 21))
    assert all(0 <= r["linear_eval_top1"] <= 100 for r in epochs)
    ckpt = load_checkpoint(pretrained / "checkpoints" / "last.pt")
    assert ckpt["stage"] == "pretrain" and ckpt["step"] == 61
    assert ckpt["model_spec"]["resnet_depth"] == 18 and ckpt["mode"] == "pretrain"


def test_finetune_from_pretrained(pretrained: Path, data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "finetune"
    _run("finetune", "--checkpoint", pretrained, "--data-dir", data_dir, "--run-dir", run_dir, *FAST,
         "--labels-per-class", "4", "--train-batch-size", "20", "--train-epochs", "30", "--learning-rate", "0.05",
         "--log-every-steps", "1")
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["num_labelled"] == 40 and result["num_examples"] == 40
    assert 0 <= result["top1"] <= result["top5"] <= 100
    losses = [r["sup_loss"] for r in read_metrics(run_dir, "step")]
    assert _mean(losses[-5:]) < _mean(losses[:5])
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["mode"] == "finetune" and ckpt["model_spec"]["num_classes"] == 10
    assert ckpt["model_spec"]["ft_proj_selector"] == 1
    saved = json.loads((run_dir / "config.json").read_text())["model"]  # the checkpoint's network, not the preset's
    assert (saved["resnet_depth"], saved["width_multiplier"]) == (18, 0.125)


def test_finetune_trains_only_the_selected_head_layers(pretrained: Path, data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "finetune"
    _run("finetune", "--checkpoint", pretrained, "--data-dir", data_dir, "--run-dir", run_dir, *FAST,
         "--labels-per-class", "4", "--train-batch-size", "20", "--train-steps", "3", "--ft-proj-selector", "2")
    before = load_checkpoint(pretrained / "checkpoints" / "last.pt")["model"]
    after = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    changed = {k for k in after if k in before and after[k].dtype.is_floating_point
               and not torch.equal(after[k], before[k])}
    assert any(k.startswith("projection_head.layers.1.") for k in changed)
    assert not any(k.startswith("projection_head.layers.2.") for k in changed)
    assert after["supervised_head.linear.weight"].shape[1] == before["projection_head.layers.1.linear.weight"].shape[0]


def test_distill_matches_teacher_and_keeps_it_frozen(pretrained: Path, data_dir: Path, tmp_path: Path) -> None:
    teacher_dir = tmp_path / "teacher"
    _run("finetune", "--checkpoint", pretrained, "--data-dir", data_dir, "--run-dir", teacher_dir, *FAST,
         "--labels-per-class", "4", "--train-batch-size", "20", "--train-epochs", "20", "--learning-rate", "0.05")
    teacher_file = teacher_dir / "checkpoints" / "last.pt"
    teacher_before = load_checkpoint(teacher_file)["model"]
    run_dir = tmp_path / "distill"
    _run("distill", "--checkpoint", teacher_dir, "--data-dir", data_dir, "--run-dir", run_dir, *FAST,
         "--train-batch-size", "32", "--train-epochs", "10", "--learning-rate", "0.3", "--log-every-steps", "1",
         "--distill-alpha", "0.5", "--labels-per-class", "2")
    teacher_after = load_checkpoint(teacher_file)["model"]
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    steps = read_metrics(run_dir, "step")
    losses = [r["distill_loss"] for r in steps]
    assert _mean(losses[-5:]) < _mean(losses[:5])
    assert all("sup_loss" in r for r in steps)
    student = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert student["model_spec"]["resnet_depth"] == 18 and student["model_spec"]["width_multiplier"] == 0.125
    assert json.loads((run_dir / "eval.json").read_text())["num_examples"] == 40


def test_distill_into_a_smaller_student(pretrained: Path, data_dir: Path, tmp_path: Path) -> None:
    teacher_dir = tmp_path / "teacher"
    _run("finetune", "--checkpoint", pretrained, "--data-dir", data_dir, "--run-dir", teacher_dir, *FAST,
         "--labels-per-class", "4", "--train-batch-size", "20", "--train-steps", "2")
    run_dir = tmp_path / "distill"
    _run("distill", "--checkpoint", teacher_dir, "--data-dir", data_dir, "--run-dir", run_dir, *FAST,
         "--train-batch-size", "32", "--train-steps", "2", "--student.resnet-depth", "18",
         "--student.width-multiplier", "0.0625", "--student.num-proj-layers", "2")
    student = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model_spec"]
    assert (student["width_multiplier"], student["num_proj_layers"]) == (0.0625, 2)


def test_linear_eval_and_evaluate(pretrained: Path, data_dir: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "linear"
    _run("linear-eval", "--checkpoint", pretrained, "--data-dir", data_dir, "--run-dir", run_dir, *FAST,
         "--train-epochs", "20", "--train-batch-size", "32")
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["num_labelled"] == 96 and 0 <= result["top1"] <= 100
    capsys.readouterr()
    eval_dir = tmp_path / "evaluate"
    _run("evaluate", "--checkpoint", pretrained, "--data-dir", data_dir, "--run-dir", eval_dir, *FAST)
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_examples"] == 40 and printed["top1"] <= printed["top5"]
    assert json.loads((eval_dir / "eval.json").read_text()) == printed
    assert json.loads((eval_dir / "config.json").read_text())["checkpoint"] == str(pretrained)


def test_distill_from_a_pretraining_checkpoint_warns(pretrained: Path, data_dir: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="not fine-tuned"):
        _run("distill", "--checkpoint", pretrained, "--data-dir", data_dir, "--run-dir", tmp_path / "distill",
             *FAST, "--train-batch-size", "32", "--train-steps", "1")


def test_pretrain_with_memory_queue(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "moco"
    _run("pretrain", "--data-dir", data_dir, "--run-dir", run_dir, *TINY_MODEL, *FAST, "--use-memory", "true",
         "--memory-size", "100", "--train-batch-size", "32", "--train-steps", "4")
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    queue = ckpt["state"]["memory_queue"]
    assert int(queue["num_filled"]) == 100 and int(queue["ptr"]) == (4 * 64) % 100
    momentum = ckpt["state"]["momentum_model"]
    online = ckpt["model"]
    assert set(momentum) == set(online)
    assert not torch.equal(momentum["encoder.stem.conv1.weight"], online["encoder.stem.conv1.weight"])


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_pretraining_saves_a_plain_model(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "compiled"
    _run("pretrain", "--data-dir", data_dir, "--run-dir", run_dir, *TINY_MODEL, *FAST, "--compile", "true",
         "--train-batch-size", "32", "--train-steps", "2")
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2 and not any("_orig_mod" in key for key in ckpt["model"])  # the wrapper is not saved
    model = simclrv2.load(str(run_dir))
    assert set(model.state_dict()) == set(ckpt["model"])
    assert all(r["loss"] == r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step")


def test_pipeline_report(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "pipeline"
    tiny = ["--pretrain.resnet-depth", "18", "--pretrain.width-multiplier", "0.125",
            "--pretrain.train-steps", "3", "--pretrain.train-batch-size", "32",
            "--finetune.train-steps", "2", "--baseline.train-steps", "2", "--distill.train-steps", "2",
            "--distill.train-batch-size", "32", "--linear-eval.train-steps", "2"]
    _run("pipeline", "--data-dir", data_dir, "--run-dir", run_dir, *FAST, *tiny,
         "--label-fractions", "0.5", "--labels-per-class", "2", "--seeds", "0,3")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["seeds"] == [0, 3] and set(report["per_seed"]) == {"0", "3"}
    assert set(report["label_fractions"]) == {"0.5", f"{20 / 96:g}"}
    for key, entry in report["label_fractions"].items():
        assert set(entry) >= {"baseline", "linear_eval", "finetuned", "distilled"}
        assert all(0 <= entry[s]["top1"] <= entry[s]["top5"] <= 100 for s in ("baseline", "finetuned"))
        for stage in ("baseline", "finetuned"):  # the mean and spread are those of the seeds' own results
            values = [report["per_seed"][s]["label_fractions"][key][stage]["top1"] for s in ("0", "3")]
            assert entry[stage]["top1_seeds"] == values and entry[stage]["top1"] == pytest.approx(sum(values) / 2)
            assert entry[stage]["top1_sd"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    for seed in (0, 3):  # each seed trains its own network in its own folder
        assert (run_dir / f"seed-{seed}" / "pretrain" / "checkpoints" / "last.pt").exists()
        assert json.loads((run_dir / f"seed-{seed}" / "pretrain" / "config.json").read_text())["runtime"]["seed"] == seed
    assert report["wall_time_s"] > 0 and all(r["wall_time_s"] > 0 for r in report["per_seed"].values())
    assert (run_dir / "report.png").stat().st_size > 1000
    text = (run_dir / "report.md").read_text()
    assert "Fine-tuned minus baseline" in text and " ± " in text and "seeds 0, 3" in text


def test_distill_student_init_copies_the_pretrained_network(pretrained: Path, data_dir: Path, tmp_path: Path,
                                                             capsys) -> None:
    teacher_dir = tmp_path / "teacher"
    _run("finetune", "--checkpoint", pretrained, "--data-dir", data_dir, "--run-dir", teacher_dir, *FAST,
         "--labels-per-class", "4", "--train-batch-size", "20", "--train-steps", "2")
    run_dir = tmp_path / "distill"
    _run("distill", "--checkpoint", teacher_dir, "--data-dir", data_dir, "--run-dir", run_dir, *FAST,
         "--train-batch-size", "32", "--train-steps", "1", "--learning-rate", "1e-12", "--student-init", pretrained)
    student = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    source = load_checkpoint(pretrained / "checkpoints" / "last.pt")["model"]
    for name in ("encoder.stem.conv1.weight", "projection_head.layers.0.linear.weight"):
        torch.testing.assert_close(student[name], source[name], rtol=0, atol=1e-6)
    code = main(["distill", "--checkpoint", str(teacher_dir), "--data-dir", str(data_dir), *FAST,
                 "--run-dir", str(tmp_path / "bad"), "--student.width-multiplier", "0.0625",
                 "--student-init", str(pretrained)])
    assert code == 2 and "--student-init" in capsys.readouterr().err


def test_paper_fine_tune_rule_for_wider_models_and_more_labels() -> None:
    """SimCLRv2 section 4: lr 0.005 x sqrt(B) (0.002 for width > 1 or SK), 60 epochs at 1 %, 30 at 10 %."""
    from simclrv2 import config
    from simclrv2.stages.finetune import paper_recipe

    imagenet = config.build("finetune", {"data": {"dataset": "folder"}})
    assert (imagenet.optim.learning_rate, imagenet.optim.train_epochs) == (0.005, 60.0)
    assert paper_recipe(imagenet, 0.01) == imagenet
    ten = paper_recipe(imagenet, 0.1).optim
    assert (ten.learning_rate, ten.train_epochs) == (0.005, 30.0)
    for model in ({"width_multiplier": 2.0}, {"sk_ratio": 0.0625}):
        wide = config.build("finetune", {"data": {"dataset": "folder"}, "model": model})
        assert paper_recipe(wide, 0.01).optim.learning_rate == 0.002
    chosen = config.build("finetune", {"data": {"dataset": "folder"}, "model": {"width_multiplier": 2.0},
                                       "optim": {"learning_rate": 0.005, "train_epochs": 60}})
    assert paper_recipe(chosen, 0.1) == chosen  # the user's values stay
