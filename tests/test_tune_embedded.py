"""experiments/tune_embedded.py: its grid, its choice, and a one-setting miniature end to end."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tiny_data import write_tiny_fashion_mnist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))  # as when the scripts run
import tune_embedded as tune  # noqa: E402


def test_every_stage_gets_a_search_of_the_same_size() -> None:
    grid = tune.settings(tune.GRID)
    assert len(grid) == len(tune.settings(tune.DISTILL_GRID)) == 8
    assert grid[0] == {"learning_rate": 0.02, "train_epochs": 60, "crop_min_area": 0.08}
    assert len({tune.name(s) for s in grid}) == 8
    assert tune.flags({"learning_rate": 0.03, "student_init": "scratch"}) == ["--learning-rate", "0.03"]


def test_the_best_validation_accuracy_wins_and_the_first_of_equals() -> None:
    trials = [{"val_top1": 70.0, "i": 0}, {"val_top1": 72.0, "i": 1}, {"val_top1": 72.0, "i": 2}]
    assert tune.best(trials)["i"] == 1


def test_the_preset_takes_the_best_mean_over_the_amounts() -> None:
    trials = [{"stage": "finetune", "amount": a, "setting": {"learning_rate": lr}, "val_top1": v}
              for a, lr, v in (("10", 0.1, 60.0), ("1pct", 0.1, 90.0), ("10", 0.3, 70.0), ("1pct", 0.3, 78.0),
                               ("10", 1.0, 99.0))]  # lr 1 was not tried at every amount
    choice = tune.best_over_amounts(trials, "finetune")
    assert choice["setting"] == {"learning_rate": 0.1} and choice["mean_val_top1"] == 75.0
    assert choice["val_top1"] == {"10": 60.0, "1pct": 90.0}  # not the best at 10 alone


def test_miniature_search_judges_on_val_and_never_reads_test(tmp_path: Path, monkeypatch) -> None:
    data = write_tiny_fashion_mnist(tmp_path / "data", n_train=200, n_test=40)
    monkeypatch.setattr(tune, "GRID", {"learning_rate": [0.1], "train_epochs": [1]})
    monkeypatch.setattr(tune, "DISTILL_GRID", {"learning_rate": [0.1], "student_init": ["pretrained", "scratch"]})
    monkeypatch.setattr(tune, "AMOUNTS", {"3-per-class": ["--labels-per-class", "3"]})
    (data / "t10k-images-idx3-ubyte.gz").write_bytes(b"not a test split")  # any read of it would fail
    out = tmp_path / "tune"
    flags = ["--data-dir", str(data), "--train-steps", "1",
             "--train-batch-size", "32", "--val-fraction", "0.2"]
    assert tune.main(["--out", str(out), "--amounts", "3-per-class", *flags]) == 0
    record = json.loads((out / "tuning.json").read_text())
    assert [t["stage"] for t in record["trials"]] == ["baseline", "finetune", "distill", "distill"]
    assert record["trials"][2]["setting"]["student_init"] == "pretrained"
    assert set(record["chosen"]) == {"3-per-class/baseline", "3-per-class/finetune", "3-per-class/distill"}
    for trial in record["trials"]:
        result = json.loads((out / trial["folder"] / "eval.json").read_text())
        assert result["num_examples"] == 40 and trial["val_top1"] == result["top1"]  # the 20 % of 200 held out
    assert tune.main(["--out", str(out), "--amounts", "3-per-class", *flags]) == 0  # a rerun finds it all done
    table = (out / "tuning.md").read_text()
    assert set(record["preset"]) == {"baseline", "finetune", "distill"} and record["machine"]["cpu"]
    assert "**3-per-class**" in table and table.count("| distill |") == 2 and table.count("**") >= 4
