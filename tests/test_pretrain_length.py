"""experiments/pretrain_length.py: a miniature end to end, judged on val, never reading test."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tiny_data import write_tiny_fashion_mnist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))  # as when the scripts run
import pretrain_length as length  # noqa: E402


def test_miniature_compares_each_length_with_one_baseline_on_val(tmp_path: Path, monkeypatch) -> None:
    data = write_tiny_fashion_mnist(tmp_path / "data", n_train=200, n_test=40)
    (data / "t10k-images-idx3-ubyte.gz").write_bytes(b"not a test split")  # any read of it would fail
    # 1 % of 160 images is below one per class: the miniature's "1pct" is 3 per class.
    monkeypatch.setitem(sys.modules["tune_embedded"].AMOUNTS, "1pct", ["--labels-per-class", "3"])
    out = tmp_path / "length"
    flags = ["--data-dir", str(data), "--train-batch-size", "32", "--val-fraction", "0.2", "--jobs", "1"]
    assert length.main(["--out", str(out), "--epochs", "1,2", *flags]) == 0
    record = json.loads((out / "pretrain_length.json").read_text())
    rows = record["pretraining"]
    assert [r["epochs"] for r in rows] == [1, 2]
    assert [len(r["per_epoch"]) for r in rows] == [1, 2]
    # The official step count on the 160 images outside val (80 % of 200), batch 32: 160 * e // 32 + 1.
    assert [r["steps"] for r in rows] == [6, 11]
    for row in rows:
        assert row["seconds"] > 0
        assert row["finetuned_minus_baseline"] == round(row["finetuned_val_top1"] - record["baseline_val_top1"], 2)
    for folder in ("1pct/baseline-pretrainepochs0", "1pct/finetune-pretrainepochs2"):
        assert json.loads((out / folder / "eval.json").read_text())["num_examples"] == 40  # the val split
    assert length.main(["--out", str(out), "--epochs", "1,2", *flags]) == 0  # a rerun finds it all done

