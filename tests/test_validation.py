"""Every numeric setting is checked for finiteness and range before any work starts, with one line
naming its flag (issue #20, class 1). Each case below once passed (NaN gets past ``<= 0``), ran with
a nonsensical value, or stopped with a raw traceback."""
from __future__ import annotations

from pathlib import Path

import pytest

from simclrv2 import config
from cli_checks import expect_one_line_error

COMMON = ["--progress", "false", "--precision", "fp32", "--num-threads", "1"]


@pytest.mark.parametrize("stage, flags, fragment", [
    ("pretrain", ["--learning-rate", "nan"], "--learning-rate must be a finite number"),
    ("pretrain", ["--learning-rate", "1e400"], "--learning-rate must be a finite number"),
    ("pretrain", ["--temperature", "nan"], "--temperature must be a finite number"),
    ("pretrain", ["--temperature", "inf"], "--temperature must be a finite number"),
    ("pretrain", ["--train-epochs", "inf"], "--train-epochs must be a finite number"),
    ("pretrain", ["--momentum", "5"], "--momentum must be in [0, 1)"),
    ("pretrain", ["--warmup-epochs", "-3"], "--warmup-epochs must be >= 0"),
    ("pretrain", ["--color-jitter-strength", "-1"], "--color-jitter-strength must be >= 0"),
    ("pretrain", ["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    ("pretrain", ["--keep-checkpoint-max", "0"], "--keep-checkpoint-max must be >= 1"),
    ("pretrain", ["--num-workers", "-1"], "--num-workers must be >= 0"),
    ("pretrain", ["--num-threads", "-2"], "--num-threads must be >= 1"),
    ("pretrain", ["--seed", "100000000000000000000"], "--seed must be in [0, 4294967296)"),
    ("pretrain", ["--width-multiplier", "0.01"], "--width-multiplier must be >= 0.015625"),
    ("pretrain", ["--memory-momentum", "2"], "--memory-momentum must be in [0, 1)"),
    ("pretrain", ["--proj-out-dim", "0"], "--proj-out-dim must be >= 1"),
    ("distill", ["--distill-temperature", "nan"], "--distill-temperature must be a finite number"),
    ("distill", ["--student.width-multiplier", "0"], "--student.width-multiplier must be >= 0.015625"),
    ("distill", ["--student.resnet-depth", "7"], "--student.resnet-depth 7 is not supported"),
    ("distill", ["--student.sk-ratio", "-1"], "--student.sk-ratio must be >= 0"),
    ("distill", ["--student.num-proj-layers", "-1"], "--student.num-proj-layers must be >= 0"),
    ("linear-eval", ["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    ("evaluate", ["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    ("evaluate", ["--num-threads", "0"], "--num-threads must be >= 1"),
    ("finetune", ["--fine-tune-after-block", "9"], "--fine-tune-after-block must be in [-1, 4]"),
    ("pipeline", ["--label-fractions", "0.5,nan"], "--label-fractions must be a finite number"),
    ("pipeline", ["--labels-per-class", "1.5"], "--labels-per-class values must be positive whole numbers"),
    ("pipeline", ["--pretrain.temperature", "nan"], "--pretrain.temperature must be a finite number"),
    ("pipeline", ["--distill.distill-temperature", "0"], "--distill.distill-temperature must be positive"),
    ("pipeline", ["--baseline.warmup-epochs", "-1"], "--baseline.warmup-epochs must be >= 0"),
    ("pipeline", ["--seeds", "0,1.5"], "--seeds values must be whole numbers"),
    ("pipeline", ["--seeds", "1,1"], "--seeds repeats a seed: 1,1"),
    ("pipeline", ["--seeds", ""], "--seeds: give at least one seed"),
    ("pipeline", ["--crop-min-area", "0"], "--crop-min-area must be in (0, 1]"),
    ("finetune", ["--val-fraction", "1"], "--val-fraction must be in (0, 1)"),
])
def test_bad_numbers_are_refused_at_start_up_naming_the_flag(capsys, tmp_path: Path, stage: str, flags: list,
                                                             fragment: str) -> None:
    """Refused before anything is read or written: the checkpoint and data named do not exist."""
    missing = tmp_path / "missing"
    checkpoint = [] if stage in ("pretrain", "pipeline") else ["--checkpoint", missing / "ckpt.pt"]
    expect_one_line_error(capsys, [stage, "--data-dir", missing, "--run-dir", tmp_path / "run", *checkpoint, *COMMON,
                                   *flags], fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["nan", "inf", float("nan"), float("-inf")])
def test_python_and_file_values_must_be_finite(value) -> None:
    with pytest.raises(config.ConfigError, match="--temperature must be a finite number"):
        config.build("pretrain", {"temperature": value})
    with pytest.raises(config.ConfigError, match="--distill.learning-rate must be a finite number"):
        config.build("pipeline", {"distill": {"optim": {"learning_rate": value}}})


def test_pipeline_takes_seeds_not_seed(tmp_path: Path) -> None:
    from simclrv2.cli import build_parser
    from simclrv2.stages import pipeline

    args = build_parser().parse_args(["pipeline", "--seed", "3"])  # the pipeline has only --seeds
    assert config.resolve("pipeline", args).seeds == [3]
    with pytest.raises(config.ConfigError, match="takes --seeds"):  # a config file's runtime.seed
        pipeline.validate(config.build("pipeline", {"runtime": {"seed": 1}}), tmp_path)
