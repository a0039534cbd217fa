"""The pipeline report: a table of top-1/top-5 per stage and label fraction, as JSON, Markdown and PNG."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STAGE_LABELS = {"baseline": "Supervised baseline", "linear_eval": "Linear eval (pretrained)",
                "finetuned": "Fine-tuned (teacher)", "distilled": "Distilled (student)"}


def _fraction_title(key: str, entry: dict[str, Any]) -> str:
    return f"{100 * float(key):.3g} % ({entry['num_labelled']} labels)"


def pipeline_table(report: dict[str, Any]) -> str:
    """Markdown table: one row per stage, one top-1 / top-5 column pair per label fraction."""
    fractions = report["label_fractions"]
    keys = sorted(fractions, key=float)
    header = "| stage | " + " | ".join(_fraction_title(k, fractions[k]) for k in keys) + " |"
    rule = "|---|" + "---:|" * len(keys)
    rows = [header, rule]
    for stage, title in STAGE_LABELS.items():
        cells = [f"{fractions[k][stage]['top1']:.1f} / {fractions[k][stage]['top5']:.1f}" for k in keys]
        rows.append(f"| {title} | " + " | ".join(cells) + " |")
    gains = [f"{fractions[k]['finetuned']['top1'] - fractions[k]['baseline']['top1']:+.1f}" for k in keys]
    rows.append("| Fine-tuned minus baseline (top-1) | " + " | ".join(gains) + " |")
    return "\n".join(rows)


def plot_pipeline(report: dict[str, Any], path: Path) -> None:
    """Grouped bars of top-1 accuracy per stage and label fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = report["label_fractions"]
    keys = sorted(fractions, key=float)
    width = 0.8 / len(STAGE_LABELS)
    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(keys), 4.2))
    for i, (stage, title) in enumerate(STAGE_LABELS.items()):
        values = [fractions[k][stage]["top1"] for k in keys]
        xs = [j + (i - (len(STAGE_LABELS) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, values, width, label=title)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(range(len(keys)), [_fraction_title(k, fractions[k]) for k in keys])
    ax.set_xlabel("labelled fraction of the training set")
    ax.set_ylabel("top-1 accuracy (%)")
    low = min(fractions[k][s]["top1"] for k in keys for s in STAGE_LABELS)
    ax.set_ylim(max(0.0, low - 10), 100)
    ax.set_title("SimCLRv2: what each stage buys")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_pipeline_report(report: dict[str, Any], run_dir: Path) -> None:
    """Write ``report.json``, ``report.md`` and ``report.png`` and print the table."""
    run_dir = Path(run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    table = pipeline_table(report)
    text = f"# SimCLRv2 pipeline report\n\nTop-1 / top-5 accuracy (%) on the held-out split.\n\n{table}\n\n" \
           f"Wall time: {report['wall_time_s']:.0f} s\n"
    (run_dir / "report.md").write_text(text)
    plot_pipeline(report, run_dir / "report.png")
    print("\n" + table + f"\n\nwall time {report['wall_time_s']:.0f} s; report in {run_dir}/report.{{json,md,png}}")
