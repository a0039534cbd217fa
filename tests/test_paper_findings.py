"""experiments/paper_findings.py: its pure parts, and its --quick miniature end to end (resumed)."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "paper_findings.py"


def _load():
    spec = importlib.util.spec_from_file_location("paper_findings", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


pf = _load()


# --------------------------------------------------------------------------- pure parts


def test_summarize_gives_every_seed_mean_and_sample_sd() -> None:
    s = pf.summarize({2: 74.0, 0: 70.0, 1: 72.0})
    assert s["per_seed"] == {"0": 70.0, "1": 72.0, "2": 74.0}
    assert s["n"] == 3 and s["mean"] == 72.0 and s["sd"] == 2.0  # sample sd (n - 1)
    assert pf.summarize({0: 61.5}) == {"per_seed": {"0": 61.5}, "n": 1, "mean": 61.5, "sd": None}


def test_choice_follows_mean_validation_accuracy_and_first_on_a_tie() -> None:
    validation = {0: {0: 70.0, 1: 80.0}, 1: {0: 76.0, 1: 76.0}, 2: {0: 60.0, 1: 61.0}}
    assert pf.choose_by_validation(validation) == 1  # means 75, 76, 60.5: not seed 1's best alone
    validation[0] = {0: 72.0, 1: 80.0}  # mean 76.0 ties layer 1: the first wins
    assert pf.choose_by_validation(validation) == 0
    validation[2] = {0: 90.0, 1: 91.0}
    assert pf.choose_by_validation(validation) == 2


def test_folders_name_what_the_run_computes() -> None:
    model = pf.Model(18, 0.25)
    assert model.key() == "r18-w0.25-head3"
    assert pf.Model(34, 0.5, pf.SK_RATIO, 4, memory=True).key() == "r34-w0.5-sk-head4-memory"
    folder = pf.run_folder("finetune", model.key(), "layer1", pf.amount_name(("fraction", 0.01)), seed=2)
    assert folder == "finetune/r18-w0.25-head3/layer1/1%/seed2"
    assert pf.amount_name(("per_class", 10)) == "10-per-class"
    keys = {m.key() for m in pf.encoder_sizes(model)}
    assert len(keys) == 6 and {"r18-w0.5-head3", "r34-w0.25-sk-head3"} <= keys


def test_validation_is_held_out_from_every_label_draw() -> None:
    labels = [i % 3 for i in range(300)]  # 100 images a class
    val = pf.draw_per_class(labels, {c: 20 for c in range(3)}, pf.VALIDATION_SEED)
    assert len(val) == 60 and all(sum(labels[i] == c for i in val) == 20 for c in range(3))
    counts = pf.per_class_counts(labels, ("fraction", 0.05))
    assert counts == {0: 5, 1: 5, 2: 5}
    draws = [pf.draw_per_class(labels, counts, seed, frozenset(val)) for seed in (0, 1)]
    assert all(not set(d) & set(val) for d in draws) and draws[0] != draws[1]
    assert draws[0] == pf.draw_per_class(labels, counts, 0, frozenset(val))  # reproducible
    with pytest.raises(ValueError, match="fewer than"):
        pf.draw_per_class(labels, {0: 81}, 0, frozenset(val))


def test_runs_are_ordered_after_what_they_need() -> None:
    tasks = {f: pf.Task("finetune", f, 0, [], needs) for f, needs in
             (("c", ["b"]), ("b", ["a"]), ("a", []), ("d", ["a"]))}
    assert [[t.folder for t in group] for group in pf.levels(tasks)] == [["a"], ["b", "d"], ["c"]]


def test_a_study_folder_refuses_other_label_settings(tmp_path: Path) -> None:
    pf.claim_study(tmp_path, {"quick": False, "val_per_class": 500})
    pf.claim_study(tmp_path, {"quick": False, "val_per_class": 500})  # the same: resumes
    with pytest.raises(SystemExit, match="val_per_class=500; rerun with the same settings"):
        pf.claim_study(tmp_path, {"quick": False, "val_per_class": 100})


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_quick_study_writes_results_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "study"
    command = [sys.executable, str(SCRIPT), "--quick", "--jobs", "2", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    results = json.loads((out / "results.json").read_text())
    assert set(results["findings"]) == {"1", "2", "3", "4", "5"}
    assert results["machine"]["commit"] and results["machine"]["cpu"]
    expected = {"1": 3, "2": 3, "3": 6, "4": 4, "5": 2}
    for key, finding in results["findings"].items():
        assert list(finding["amounts"]) == results["label_amounts"] == ["10-per-class"]
        variants = finding["amounts"]["10-per-class"]
        assert len(variants) == expected[key], key
        for summary in variants.values():
            assert set(summary["per_seed"]) == {"0"} and summary["mean"] == summary["per_seed"]["0"]
        assert (out / f"finding-{key}.png").stat().st_size > 0
    chosen = results["findings"]["2"]["details"]["10-per-class"]
    assert [chosen[f"{h} layers"]["chosen_layer"] in range(h) for h in (2, 3, 4)] == [True] * 3
    assert all(" --seed 0 " in r["command"] and r["seconds"] > 0 for r in results["runs"].values())
    assert "| variant |" in (out / "results.md").read_text()

    again = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    assert set(re.findall(r"running (\d+)", again.stdout)) == {"0"}  # every run was skipped
    assert json.loads((out / "results.json").read_text())["findings"] == results["findings"]
