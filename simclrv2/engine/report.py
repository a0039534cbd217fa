"""Reports: the one-screen summary each stage prints at its end, the pipeline's top-1/top-5 table
(JSON, Markdown, PNG) and, for any run folder, training curves from ``metrics.jsonl`` plus one
self-contained HTML page (``report.html``)."""
from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

from simclrv2.engine.checkpoint import atomic_write, write_json, write_text
from simclrv2.engine.logging import METRICS_FILE, read_metrics
from simclrv2.engine.run_folder import is_stale

STAGE_LABELS = {"baseline": "Supervised baseline", "linear_eval": "Linear eval (pretrained)",
                "finetuned": "Fine-tuned (teacher)", "distilled": "Distilled (student)"}


_SHOWN = ("step", "epoch", "loss", "contrast_acc", "sup_acc", "linear_eval_top1", "top1", "top5",
          "images_per_s", "skipped_steps", "wall_time_s")


def format_summary(stage: str, run_dir: Path, metrics: dict[str, Any], runtime: dict[str, Any]) -> str:
    """A short, aligned block: what ran where, the headline metrics and the output folder."""
    lines = [f"== {stage} done " + "=" * max(0, 50 - len(stage))]
    for key in _SHOWN:
        if key in metrics:
            value = metrics[key]
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"  {key:<18} {text}")
    lines.append("  " + ", ".join(f"{k}={v}" for k, v in runtime.items()))
    lines.append(f"  outputs            {run_dir} (config.json, metrics.jsonl, checkpoints/)")
    return "\n".join(lines)


def print_summary(stage: str, run_dir: Path, metrics: dict[str, Any], runtime: dict[str, Any]) -> None:
    print(format_summary(stage, run_dir, metrics, runtime), flush=True)


def save_figure(fig: Any, path: Path, dpi: int) -> None:
    """``fig`` as a PNG through :func:`~simclrv2.engine.checkpoint.atomic_write`."""
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi))


GAINS = {"finetuned_minus_baseline": ("finetuned", "baseline", "Fine-tuned minus baseline (top-1)"),
         "distilled_minus_finetuned": ("distilled", "finetuned", "Distilled minus fine-tuned (top-1)")}


def _spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and the values themselves."""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "values": values}


def summarise_seeds(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The pipeline report of several seeds' results (each as ``pipeline._run_seed`` returns):
    per label amount and stage, the mean top-1/top-5 with their standard deviations and every
    seed's values; per label amount, the gains of fine-tuning and distillation computed seed by
    seed; and each seed's own results under ``per_seed``."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]["label_fractions"]
    fractions: dict[str, Any] = {}
    for key, entry in first.items():
        runs = [per_seed[s]["label_fractions"][key] for s in seeds]
        fractions[key] = {"num_labelled": entry["num_labelled"]}
        for stage in STAGE_LABELS:
            top1, top5 = _spread([r[stage]["top1"] for r in runs]), _spread([r[stage]["top5"] for r in runs])
            fractions[key][stage] = {"top1": top1["mean"], "top5": top5["mean"], "top1_sd": top1["sd"],
                                     "top5_sd": top5["sd"], "top1_seeds": top1["values"], "top5_seeds": top5["values"]}
        for name, (better, than, _) in GAINS.items():
            gain = _spread([r[better]["top1"] - r[than]["top1"] for r in runs])
            fractions[key][name] = {"top1": gain["mean"], "top1_sd": gain["sd"], "top1_seeds": gain["values"]}
    return {"seeds": [int(s) for s in seeds], "label_fractions": fractions, "per_seed": per_seed}


def _fraction_title(key: str, entry: dict[str, Any]) -> str:
    return f"{100 * float(key):.3g} % ({entry['num_labelled']} labels)"


def _cell(entry: dict[str, Any], metric: str, signed: bool = False) -> str:
    """``mean`` or ``mean ± sd`` when the entry has a spread over seeds."""
    value = f"{entry[metric]:+.1f}" if signed else f"{entry[metric]:.1f}"
    return value + (f" ± {entry[metric + '_sd']:.1f}" if len(entry.get(metric + "_seeds", ())) > 1 else "")


def pipeline_table(report: dict[str, Any]) -> str:
    """Markdown table: one row per stage, one top-1 / top-5 column pair per label fraction; with
    several seeds each cell is the mean ± the standard deviation over seeds."""
    fractions = report["label_fractions"]
    keys = sorted(fractions, key=float)
    header = "| stage | " + " | ".join(_fraction_title(k, fractions[k]) for k in keys) + " |"
    rule = "|---|" + "---:|" * len(keys)
    rows = [header, rule]
    for stage, title in STAGE_LABELS.items():
        cells = [f"{_cell(fractions[k][stage], 'top1')} / {_cell(fractions[k][stage], 'top5')}" for k in keys]
        rows.append(f"| {title} | " + " | ".join(cells) + " |")
    for name, (better, than, title) in GAINS.items():  # reports of one seed from before 2026-12 lack them
        gains = [fractions[k].get(name) or {"top1": fractions[k][better]["top1"] - fractions[k][than]["top1"]}
                 for k in keys]
        rows.append(f"| {title} | " + " | ".join(f"**{_cell(g, 'top1', signed=True)}**" for g in gains) + " |")
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
        spread = [fractions[k][stage].get("top1_sd", 0.0) for k in keys]
        xs = [j + (i - (len(STAGE_LABELS) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, values, width, label=title, yerr=spread if any(spread) else None, capsize=3)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(range(len(keys)), [_fraction_title(k, fractions[k]) for k in keys])
    ax.set_xlabel("labelled fraction of the training set")
    ax.set_ylabel("top-1 accuracy (%)")
    low = min(fractions[k][s]["top1"] for k in keys for s in STAGE_LABELS)
    ax.set_ylim(max(0.0, low - 10), 100)
    seeds = report.get("seeds", [])
    ax.set_title("SimCLRv2: what each stage buys" + (f" (mean ± sd of {len(seeds)} seeds)" if len(seeds) > 1 else ""))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def write_pipeline_report(report: dict[str, Any], run_dir: Path) -> None:
    """Write ``report.json``, ``report.md`` and ``report.png`` and print the table."""
    run_dir = Path(run_dir)
    write_json(run_dir / "report.json", report)
    table = pipeline_table(report)
    seeds = report.get("seeds", [])
    spread = f", mean ± standard deviation over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""
    times = ", ".join(f"seed {s}: {r['wall_time_s']:.0f} s" for s, r in report.get("per_seed", {}).items())
    text = f"# SimCLRv2 pipeline report\n\nTop-1 / top-5 accuracy (%) on the held-out split{spread}.\n\n{table}\n\n" \
           f"Wall time: {report['wall_time_s']:.0f} s" + (f" ({times})" if times else "") + "\n"
    write_text(run_dir / "report.md", text)
    plot_pipeline(report, run_dir / "report.png")
    print("\n" + table + f"\n\nwall time {report['wall_time_s']:.0f} s; report in {run_dir}/report.{{json,md,png}}")


# ----------------------------------------------------------------------------- curves and HTML

REPORT_HTML = "report.html"
FIGURE_DIR = "report_figures"
CURVES = {"loss": "loss", "contrast_acc": "contrastive accuracy", "linear_eval_top1": "linear-eval top-1",
          "learning_rate": "learning rate"}


class ReportError(ValueError):
    """A folder holds nothing to report on."""


def find_metric_runs(run_dir: Path) -> list[tuple[str, Path]]:
    """(label, folder) for ``run_dir`` and every sub-folder with a ``metrics.jsonl``: one entry for
    a single stage run, one per stage for a pipeline (``pretrain``, ``labels-*/finetune``, ...).
    Stages a pipeline set aside as stale (``<stage>.stale-N``) are history, not results: left out."""
    run_dir = Path(run_dir)
    folders = sorted((p.parent for p in run_dir.rglob(METRICS_FILE)
                      if not any(is_stale(part) for part in p.relative_to(run_dir).parts)),
                     key=lambda f: (len(f.relative_to(run_dir).parts), f.relative_to(run_dir).as_posix()))
    return [(f.relative_to(run_dir).as_posix() if f != run_dir else run_dir.name, f) for f in folders]


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def curve_series(records: list[dict[str, Any]], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """``{record kind: (steps, values)}`` of the finite numeric values of ``metric``."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        value = _number(record.get(metric))
        if value is None or "step" not in record:
            continue
        steps, values = series.setdefault(str(record.get("kind", "step")), ([], []))
        steps.append(int(record["step"]))
        values.append(value)
    return series


def plot_curves(records: list[dict[str, Any]], title: str, path: Path) -> list[str]:
    """One panel per metric of ``CURVES`` that the records contain; returns the metrics plotted
    (nothing is written when there are none)."""
    present = {m: curve_series(records, m) for m in CURVES}
    present = {m: s for m, s in present.items() if s}
    if not present:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.0), squeeze=False)
    for ax, (metric, series) in zip(axes[0], present.items()):
        for kind, (steps, values) in series.items():
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3,
                    label=kind if len(series) > 1 else None)
        ax.set_title(CURVES[metric], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return list(present)


def accuracy_table_html(report: dict[str, Any]) -> str:
    """The pipeline's top-1 / top-5 table as an HTML ``<table>`` (missing entries shown as a dash)."""
    fractions = report.get("label_fractions", {})
    keys = sorted(fractions, key=float)
    head = "".join(f"<th>{html.escape(_fraction_title(k, fractions[k]))}</th>" for k in keys)
    rows = [f"<tr><th>stage</th>{head}</tr>"]
    for stage, title in STAGE_LABELS.items():
        cells = []
        for k in keys:
            entry = fractions[k].get(stage)
            cells.append(f"<td>{html.escape(_cell(entry, 'top1'))} / {html.escape(_cell(entry, 'top5'))}</td>"
                         if entry else "<td>&ndash;</td>")
        rows.append(f"<tr><th>{html.escape(title)}</th>{''.join(cells)}</tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _embedded_png(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


_PAGE_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse}"
               "td,th{border:1px solid #bbb;padding:.3em .6em;text-align:right}img{max-width:100%}")


def write_html_report(run_dir: Path, out: Optional[Path] = None) -> tuple[Path, list[Path]]:
    """Curves of every stage in ``run_dir`` and, for a pipeline run, its accuracy table and chart:
    PNGs in ``run_dir/report_figures/`` and one self-contained page (images embedded as base64),
    ``run_dir/report.html`` unless ``out`` is given. Returns (page, PNGs)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder; pass a run folder written by simclrv2")
    runs = find_metric_runs(run_dir)
    report_file = run_dir / "report.json"
    if not runs and not report_file.exists():
        raise ReportError(f"{run_dir} holds no {METRICS_FILE} and no report.json; pass a run or pipeline folder")
    figures = run_dir / FIGURE_DIR
    figures.mkdir(exist_ok=True)
    pngs: list[Path] = []
    body = [f"<h1>SimCLRv2 report: {html.escape(run_dir.name)}</h1>"]
    if report_file.exists():
        report = json.loads(report_file.read_text())
        body += ["<h2>Accuracy on the held-out split</h2>",
                 "<p>Top-1 / top-5 accuracy (%) per stage and labelled fraction.</p>", accuracy_table_html(report)]
        entries = report.get("label_fractions", {}).values()
        if entries and all(stage in entry for entry in entries for stage in STAGE_LABELS):
            png = figures / "accuracy.png"
            plot_pipeline(report, png)
            pngs.append(png)
            body.append(_embedded_png(png, "top-1 accuracy per stage"))
        if "wall_time_s" in report:
            body.append(f"<p>Wall time: {report['wall_time_s']:.0f} s</p>")
    body.append("<h2>Training curves</h2>")
    for label, folder in runs:
        png = figures / (re.sub(r"[^A-Za-z0-9_.-]+", "__", label) + ".png")
        body.append(f"<h3>{html.escape(label)}</h3>")
        if plot_curves(read_metrics(folder), label, png):
            pngs.append(png)
            body.append(_embedded_png(png, f"training curves of {label}"))
        else:
            body.append("<p>No loss, accuracy or learning-rate records.</p>")
    page = Path(out) if out is not None else run_dir / REPORT_HTML
    write_text(page, "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>SimCLRv2 report: "
                    f"{html.escape(run_dir.name)}</title><style>{_PAGE_STYLE}</style></head>\n<body>\n"
                    + "\n".join(body) + "\n</body></html>\n")
    return page, pngs
