"""The command line itself: help of every command, on/off flags, label options and data messages."""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import pytest
import torch

from simclrv2 import config
from simclrv2.cli import build_parser, main
from simclrv2.data import DatasetNotFoundError, TensorImageDataset, build_dataset
from simclrv2.data.splits import check_splits, labelled_indices
from cli_checks import expect_one_line_error


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _config_actions(command: str) -> list[argparse.Action]:
    return [a for a in _commands()[command]._actions if a.dest.startswith("cfg:")]


def _resolve(*argv: str):
    return config.resolve(argv[0], build_parser().parse_args(argv))


# --------------------------------------------------------------------------- --help


def test_every_command_has_help(capsys) -> None:
    commands = _commands()
    assert set(config.STAGE_CONFIGS) <= set(commands) and {"convert-tf", "export", "report"} <= set(commands)
    for name, sub in commands.items():
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
        assert exit_info.value.code == 0, name
        flags = [s for a in sub._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
        assert flags, name
        for flag in flags:
            assert flag in out, (name, flag)


def test_help_keeps_literal_percent_signs(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(0.01 = 1 %, 1 = all labels)" in out


@pytest.mark.parametrize("stage", sorted(config.STAGE_CONFIGS))
def test_help_shows_the_defaults_a_plain_run_uses(stage: str) -> None:
    resolved = _resolve(stage)
    for action in _config_actions(stage):
        value = functools.reduce(getattr, action.dest[4:].split("."), resolved)
        help_text = action.help.replace("%%", "%")
        if value is None and "default" in help_text.replace("(default: None)", ""):
            assert "(default: None)" not in help_text, (action.dest, help_text)  # said once, in words
        else:
            assert f"(default: {value}" in help_text, (action.dest, help_text)


def test_help_names_the_default_preset(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "the 'embedded' preset" in out and "--preset NAME" in out
    assert "(default: 18, from the embedded preset)" in out  # --resnet-depth, not ImageNet's 50
    assert "(default: 256, from the embedded preset)" in out  # --train-batch-size
    linear = {a.dest: a.help for a in _config_actions("linear-eval")}
    assert linear["cfg:optim.optimizer"].endswith("(default: momentum)")  # the stage's own default, not lars


# --------------------------------------------------------------------------- on/off flags


@pytest.mark.parametrize("stage", sorted(config.STAGE_CONFIGS))
def test_every_bool_flag_alone_means_true(stage: str) -> None:
    bool_flags = [a for a in _config_actions(stage) if a.metavar == "BOOL"]
    assert bool_flags
    for action in bool_flags:
        path = action.dest[4:].split(".")
        flag = action.option_strings[0]
        assert functools.reduce(getattr, path, _resolve(stage, flag)) is True, flag
        assert functools.reduce(getattr, path, _resolve(stage, flag, "false")) is False, flag


def test_bool_flags_take_values_and_keep_auto() -> None:
    assert _resolve("pretrain", "--skip-bad-images", "--seed", "3").data.skip_bad_images is True
    assert _resolve("pretrain", "--use-memory").use_memory is True
    for word, value in (("true", True), ("YES", True), ("1", True), ("false", False), ("no", False), ("0", False)):
        assert _resolve("pretrain", "--skip-bad-images", word).data.skip_bad_images is value
    assert _resolve("pretrain").data.use_blur is None  # auto: decided from the image size
    assert _resolve("pretrain", "--use-blur").data.use_blur is True
    assert _resolve("pretrain", "--use-blur=no").data.use_blur is False
    assert _resolve("pipeline", "--pretrain.use-memory").pretrain.use_memory is True


def test_bad_bool_value(capsys, tmp_path: Path) -> None:
    expect_one_line_error(capsys, ["pretrain", "--skip-bad-images", "maybe", "--data-dir", tmp_path],
                  "--skip-bad-images", "'maybe'")


# --------------------------------------------------------------------------- label options


@pytest.mark.parametrize("fraction", ["2", "1.5", "0", "-0.1"])
def test_label_fraction_outside_zero_one_is_refused(capsys, tmp_path: Path, fraction: str) -> None:
    expect_one_line_error(capsys, ["finetune", "--label-fraction", fraction, "--data-dir", tmp_path,
                           "--run-dir", tmp_path / "r"], "--label-fraction must be in (0, 1]")
    assert not (tmp_path / "r").exists()


def test_label_fraction_one_uses_every_label() -> None:
    assert _resolve("finetune", "--label-fraction", "1").labels.label_fraction == 1.0
    data = TensorImageDataset(torch.zeros(6, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 0, 1, 0, 1]),
                              ("a", "b"), "toy")
    assert labelled_indices(config.LabelConfig(label_fraction=1.0), data, seed=0).tolist() == list(range(6))
    with pytest.raises(config.ConfigError, match=r"--label-fraction must be in \(0, 1\], got 2"):
        labelled_indices(config.LabelConfig(label_fraction=2.0), data, seed=0)


@pytest.mark.parametrize("flags, named", [
    (["--label-fraction", "0.01", "--labels-per-class", "10"], ("--label-fraction 0.01", "--labels-per-class 10")),
    (["--labels-per-class", "10", "--label-file", "ids.txt"], ("--labels-per-class 10", "--label-file ids.txt")),
])
def test_conflicting_label_options_are_refused(capsys, tmp_path: Path, flags: list[str],
                                              named: tuple[str, ...]) -> None:
    for stage in ("finetune", "distill", "linear-eval"):
        expect_one_line_error(capsys, [stage, *flags, "--data-dir", tmp_path], *named, "give only one of")


def test_conflict_between_config_file_and_flag(capsys, tmp_path: Path) -> None:
    file = tmp_path / "labels.json"
    file.write_text(json.dumps({"labels": {"label_fraction": 0.1}}))
    expect_one_line_error(capsys, ["finetune", "--config", file, "--labels-per-class", "4", "--data-dir", tmp_path],
                  "give only one of")


def test_one_label_option_replaces_the_stage_default() -> None:
    assert _resolve("finetune").labels == config.LabelConfig(label_fraction=0.01)
    assert _resolve("finetune", "--labels-per-class", "10").labels == config.LabelConfig(labels_per_class=10)
    assert _resolve("linear-eval", "--label-file", "ids.txt").labels == config.LabelConfig(label_file="ids.txt")
    assert config.build("distill", {"labels": {"labels_per_class": 3}}).labels == config.LabelConfig(labels_per_class=3)
    pipeline = _resolve("pipeline")  # the embedded preset asks for both amounts: still fine
    assert pipeline.labels_per_class == [10] and pipeline.label_fractions == [0.01]


# --------------------------------------------------------------------------- data messages


def test_bad_split_names_the_flag_and_the_choices(capsys, tmp_path: Path) -> None:
    expect_one_line_error(capsys, ["finetune", "--eval-split", "bogus", "--data-dir", tmp_path, "--run-dir", tmp_path / "r"],
                  "--eval-split 'bogus'", "train, test")
    with pytest.raises(config.ConfigError, match="--pretrain-split 'unlabeled' .* cifar10; choose one of: train, test"):
        check_splits(config.DataConfig(dataset="cifar10", pretrain_split="unlabeled"))
    check_splits(config.DataConfig(dataset="stl10", pretrain_split="unlabeled"))


def test_missing_dataset_says_where_the_default_data_dir_is(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"not found in \./data \(the default --data-dir.*cifar-10"):
        build_dataset("cifar10", None, "train")
    with pytest.raises(DatasetNotFoundError) as given:
        build_dataset("stl10", tmp_path / "elsewhere", "train")
    assert "default" not in str(given.value) and str(tmp_path / "elsewhere") in str(given.value)


def test_warnings_are_one_line_while_a_command_runs() -> None:
    import warnings

    from simclrv2.cli import _one_line_warnings

    original = warnings.formatwarning
    with _one_line_warnings("distill"):
        text = warnings.formatwarning("the teacher is not fine-tuned", UserWarning, "stages/distill.py", 68)
    assert text == "simclrv2 distill: warning: the teacher is not fine-tuned\n"
    assert warnings.formatwarning is original


def test_evaluate_warns_that_training_only_options_do_nothing(capsys, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="evaluate does not train, so it ignores --checkpoint-steps, --max-steps"):
        expect_one_line_error(capsys, ["evaluate", "--checkpoint", tmp_path / "missing.pt", "--data-dir", tmp_path,
                                       "--max-steps", "3", "--checkpoint-steps", "5"], "missing.pt does not exist")


def test_pipeline_keeps_each_presets_data_settings_unless_the_user_sets_them(tmp_path: Path) -> None:
    from simclrv2.stages import pipeline

    cfg = _resolve("pipeline", "--dataset", "cifar10")
    stage = pipeline._stage_cfg(cfg.pretrain, cfg, tmp_path, "pretrain")
    assert stage.data.color_jitter_strength == 0.5 and stage.data.dataset == "cifar10"  # the cifar preset's s
    cfg = _resolve("pipeline", "--dataset", "cifar10", "--color-jitter-strength", "0.8", "--eval-split", "val")
    stage = pipeline._stage_cfg(cfg.pretrain, cfg, tmp_path, "pretrain")
    assert stage.data.color_jitter_strength == 0.8 and stage.data.eval_split == "val"


def test_val_split_is_held_out_of_training_and_the_same_for_every_seed(tmp_path: Path) -> None:
    from tiny_data import write_tiny_fashion_mnist
    from simclrv2.data.splits import labelled_train_set, load_split

    data = config.DataConfig(data_dir=str(write_tiny_fashion_mnist(tmp_path, n_train=200)), eval_split="val",
                             val_fraction=0.2)
    train, val = load_split(data, "train"), load_split(data, "val")
    assert len(train) == 160 and len(val) == 40 and val.labels.bincount().tolist() == [4] * 10
    assert not set(train.sample_ids) & set(val.sample_ids)
    for seed in (0, 1):
        full, labelled = labelled_train_set(data, config.LabelConfig(labels_per_class=3), seed)
        assert set(full.sample_ids) == set(train.sample_ids) and not set(labelled.sample_ids) & set(val.sample_ids)
        assert load_split(data, "val").sample_ids == val.sample_ids
    assert len(load_split(replace_eval(data, "test"), "train")) == 200  # without it, train is whole


def replace_eval(data: config.DataConfig, split: str) -> config.DataConfig:
    import dataclasses
    return dataclasses.replace(data, eval_split=split)
