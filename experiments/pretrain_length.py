"""What a longer pretraining buys at 1 % labels, judged on the val split (issue #18: what the
targets would take).

Pretrains the embedded preset for each of ``--epochs`` on the training images outside the val
split, fine-tunes each at 1 % with the preset's fine-tune, and trains the preset's baseline on
the same labels once. Every figure is validation top-1 (``--eval-split val``), never the test
split. Each pretraining's seconds and its per-epoch monitor come from its own metrics log.
Reruns skip finished runs and resume unfinished ones (the runs of ``tune_embedded.Tuner``).

    python experiments/pretrain_length.py --out runs/pretrain-length --epochs 4,12
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from paper_findings import machine  # same folder
from tune_embedded import Tuner

from simclrv2.engine.logging import read_metrics


def pretraining_record(run_dir: Path) -> dict[str, Any]:
    """Seconds from the first to the last logged record, the last step, and each epoch's metrics."""
    records = read_metrics(run_dir)
    times = [r["time"] for r in records]
    per_epoch = [{k: v for k, v in r.items() if k not in ("kind", "time")} for r in records if r["kind"] == "epoch"]
    return {"seconds": round(max(times) - min(times), 3), "steps": max(r["step"] for r in records), "per_epoch": per_epoch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/pretrain-length"))
    parser.add_argument("--epochs", default="4,12", help="comma-separated pretraining lengths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="label runs at once, one CPU thread each")
    args, extra = parser.parse_known_args(argv)  # extra flags go to every command (e.g. --data-dir)
    lengths = [int(e) for e in args.epochs.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    tuner = Tuner(args.out, args.seed, args.jobs, extra)
    pretrained = {e: tuner.run("pretrain", f"pretrain-{e}", ["--train-epochs", str(e)]) for e in lengths}
    trials = tuner.trials_of([("baseline", "1pct", {"pretrain_epochs": 0}, "finetune", [])] +
                             [("finetune", "1pct", {"pretrain_epochs": e}, "finetune", ["--checkpoint", str(pretrained[e])])
                              for e in lengths])
    record = {"protocol": "validation top-1 at 1 % labels on a held-out 10 % of the training split "
                          "(--eval-split val); test split unused; preset settings otherwise",
              "seed": args.seed, "machine": machine(), "extra_flags": extra,
              "baseline_val_top1": trials[0]["val_top1"],
              "pretraining": [{"epochs": e, **pretraining_record(pretrained[e]), "finetuned_val_top1": t["val_top1"],
                               "finetuned_minus_baseline": round(t["val_top1"] - trials[0]["val_top1"], 2)}
                              for e, t in zip(lengths, trials[1:])]}
    (args.out / "pretrain_length.json").write_text(json.dumps(record, indent=1) + "\n")
    for row in record["pretraining"]:
        print(f"pretrain {row['epochs']:>3} epochs ({row['seconds']:.0f} s): fine-tuned at 1 % {row['finetuned_val_top1']:.2f}, "
              f"baseline {record['baseline_val_top1']:.2f} ({row['finetuned_minus_baseline']:+.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
