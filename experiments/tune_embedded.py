"""Choose the embedded preset's label-stage settings on a validation split, with the same search
budget for the supervised baseline, the fine-tune and the distillation (issue #18).

Protocol (see docs/tuning.md for what was found):

* Every run uses ``--eval-split val``: a class-balanced 10 % of Fashion-MNIST's training split
  (the same 6 000 images for every seed) is held out; pretraining, the labels and distillation
  use the other 54 000 images, and every setting is judged by top-1 on those held-out images.
  The test split is never read here; the pipeline reports on it afterwards.
* One pretraining run with the preset's settings serves every fine-tune and distillation.
* At each label amount (10 per class and 1 %) the baseline and the fine-tune each try the same
  grid (``GRID``: learning rate x epochs x smallest crop, eight settings) and the distillation
  tries eight settings of its own (``DISTILL_GRID``: learning rate x smallest crop x the
  student's start), from the best fine-tune. Everything not searched is the preset's value.

Each run is one ``python -m simclrv2`` command in its own folder under ``--out``; rerunning the
script skips finished runs and resumes unfinished ones. The results land in ``--out/tuning.json``
(every trial, its settings and validation top-1/top-5; the best per stage and amount; and
the preset's one setting per stage, the best mean over the amounts) and ``tuning.md``.

    python experiments/tune_embedded.py --out runs/tune-embedded
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from paper_findings import machine  # the findings study's record of commit, CPU and versions (same folder)

REPO = Path(__file__).resolve().parent.parent
AMOUNTS = {"10-per-class": ["--labels-per-class", "10"], "1pct": ["--label-fraction", "0.01"]}
# Eight settings for every stage. The baseline and the fine-tune search the same grid; the
# distillation's epochs are fixed by the time budget, so it searches its start instead.
GRID = {"learning_rate": [0.02, 0.08], "train_epochs": [60, 200], "crop_min_area": [0.08, 0.25]}
DISTILL_GRID = {"learning_rate": [0.03, 0.1], "crop_min_area": [0.08, 0.25], "student_init": ["pretrained", "scratch"]}


def settings(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def name(setting: dict[str, Any]) -> str:
    return "-".join(f"{key.replace('_', '')}{value:g}" if isinstance(value, (int, float)) else str(value)
                    for key, value in setting.items())


def flags(setting: dict[str, Any]) -> list[str]:
    return [arg for key, value in setting.items() if key != "student_init"
            for arg in (f"--{key.replace('_', '-')}", f"{value:g}")]


def best(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial with the highest validation top-1 (the first of equals)."""
    return max(trials, key=lambda t: t["val_top1"])


def best_over_amounts(trials: list[dict[str, Any]], stage: str) -> dict[str, Any]:
    """The preset's one setting of ``stage``: the best mean validation top-1 over the label
    amounts (the first of equals), with that mean and each amount's value."""
    by_setting: dict[str, dict[str, float]] = {}
    for t in trials:
        if t["stage"] == stage:
            by_setting.setdefault(name(t["setting"]), {})[t["amount"]] = t["val_top1"]
    amounts = {t["amount"] for t in trials if t["stage"] == stage}
    complete = {k: v for k, v in by_setting.items() if set(v) == amounts}
    key = max(complete, key=lambda k: sum(complete[k].values()) / len(amounts))
    setting = next(t["setting"] for t in trials if t["stage"] == stage and name(t["setting"]) == key)
    return {"setting": setting, "mean_val_top1": sum(complete[key].values()) / len(amounts), "val_top1": complete[key]}


def tables(record: dict[str, Any]) -> str:
    """Markdown: per label amount, validation top-1 of every setting of every stage, the chosen
    ones in bold."""
    chosen = {(stage, amount, name(c["setting"])) for stage, c in record["preset"].items() for amount in c["val_top1"]}
    lines = []
    for amount in dict.fromkeys(t["amount"] for t in record["trials"]):
        lines += [f"**{amount}** (validation top-1, %; in bold the preset's setting of each stage)", "", "| stage | setting | val top-1 |", "|---|---|---:|"]
        for t in (t for t in record["trials"] if t["amount"] == amount):
            value = f"{t['val_top1']:.2f}"
            value = f"**{value}**" if (t["stage"], amount, name(t["setting"])) in chosen else value
            lines.append(f"| {t['stage']} | {name(t['setting'])} | {value} |")
        lines.append("")
    return "\n".join(lines)


class Tuner:
    def __init__(self, out: Path, seed: int, jobs: int, extra: list[str]):
        self.out, self.seed, self.jobs, self.extra = out, seed, jobs, extra
        self.trials: list[dict[str, Any]] = []

    def run(self, command: str, folder: str, args: list[str]) -> Path:
        """Run (or resume, or skip when finished) one command in ``out/folder``; returns the folder."""
        run_dir = self.out / folder
        threads = ["--num-threads", "1"] if self.jobs > 1 and command != "pretrain" else []
        argv = [sys.executable, "-m", "simclrv2", command, "--eval-split", "val", "--seed", str(self.seed),
                "--progress", "false", "--run-dir", str(run_dir), *threads, *self.extra, *args]
        if not ((run_dir / "eval.json").exists() or (command == "pretrain" and (run_dir / "done").exists())):
            print("$", " ".join(argv[2:]), flush=True)
            with open(self.out / f"{folder.replace('/', '__')}.log", "a") as log:
                subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
            if command == "pretrain":
                (run_dir / "done").write_text("")
        return run_dir

    def trial(self, stage: str, amount: str, setting: dict[str, Any], command: str, args: list[str]) -> dict[str, Any]:
        run_dir = self.run(command, f"{amount}/{stage}-{name(setting)}", [*AMOUNTS[amount], *args])
        result = json.loads((run_dir / "eval.json").read_text())
        record = {"stage": stage, "amount": amount, "setting": setting, "val_top1": result["top1"],
                  "val_top5": result["top5"], "folder": str(run_dir.relative_to(self.out))}
        print(f"  {stage:<9} {amount:<13} {name(setting):<40} val top-1 {result['top1']:.2f}", flush=True)
        return record

    def trials_of(self, jobs: list[tuple]) -> list[dict[str, Any]]:
        """Run ``trial(*job)`` for every job, ``self.jobs`` at a time (one CPU thread each when
        more than one); records are kept in the jobs' order."""
        with ThreadPoolExecutor(self.jobs) as pool:
            records = list(pool.map(lambda job: self.trial(*job), jobs))
        self.trials += records
        return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tune-embedded"))
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (one seed: the budget of 2 CPU cores)")
    parser.add_argument("--amounts", default=",".join(AMOUNTS), help="comma-separated subset of " + ", ".join(AMOUNTS))
    parser.add_argument("--jobs", type=int, default=2, help="trials run at once, one CPU thread each")
    args, extra = parser.parse_known_args(argv)  # extra flags go to every command (e.g. --data-dir)
    args.out.mkdir(parents=True, exist_ok=True)
    tuner = Tuner(args.out, args.seed, args.jobs, extra)
    pretrained = tuner.run("pretrain", "pretrain", [])
    chosen: dict[str, dict[str, Any]] = {}
    for amount in args.amounts.split(","):
        stages = (("baseline", []), ("finetune", ["--checkpoint", str(pretrained)]))
        trials = tuner.trials_of([(stage, amount, s, "finetune", [*checkpoint, *flags(s)])
                                  for stage, checkpoint in stages for s in settings(GRID)])
        for stage, _ in stages:
            chosen[f"{amount}/{stage}"] = best([t for t in trials if t["stage"] == stage])
        teacher = tuner.out / chosen[f"{amount}/finetune"]["folder"]
        trials = tuner.trials_of([("distill", amount, s, "distill",
                                   ["--checkpoint", str(teacher), *flags(s),
                                    *(["--student-init", str(pretrained)] if s["student_init"] == "pretrained" else [])])
                                  for s in settings(DISTILL_GRID)])
        chosen[f"{amount}/distill"] = best(trials)
    record = {"protocol": "validation top-1 on a held-out 10 % of the training split (--eval-split val); "
                          "test split unused", "seed": args.seed, "grid": GRID, "distill_grid": DISTILL_GRID,
              "machine": machine(), "extra_flags": extra, "trials": tuner.trials, "chosen": chosen,
              "preset": {stage: best_over_amounts(tuner.trials, stage) for stage in ("baseline", "finetune", "distill")}}
    (args.out / "tuning.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / "tuning.md").write_text(tables(record))
    for key, trial in chosen.items():
        print(f"best   {key:<24} {name(trial['setting']):<40} val top-1 {trial['val_top1']:.2f}")
    for stage, choice in record["preset"].items():
        print(f"preset {stage:<24} {name(choice['setting']):<40} mean val top-1 {choice['mean_val_top1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
