"""``simclrv2 report``: curves from metrics.jsonl and the accuracy table as PNGs and one HTML page."""
from __future__ import annotations

import base64
import json
import re

import pytest

from simclrv2 import cli
from simclrv2.engine.report import (
    FIGURE_DIR,
    ReportError,
    curve_series,
    find_metric_runs,
    pipeline_table,
    write_html_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"kind\": \"step\", \"st")  # torn last line


def _pretrain_records():
    steps = [{"kind": "step", "step": s, "loss": 5.0 / s, "contrast_acc": 0.1 * s, "learning_rate": 0.01 * s,
              "images_per_s": 100.0} for s in range(1, 9)]
    steps.append({"kind": "step", "step": 9, "loss": "nan", "learning_rate": 0.09})
    return steps + [{"kind": "epoch", "step": 4, "epoch": 1, "linear_eval_top1": 31.0},
                    {"kind": "epoch", "step": 8, "epoch": 2, "linear_eval_top1": 42.5}]


REPORT = {"label_fractions": {
    "0.01": {"num_labelled": 600, "baseline": {"top1": 20.5, "top5": 60.0}, "linear_eval": {"top1": 40.0, "top5": 80.0},
             "finetuned": {"top1": 45.25, "top5": 85.0}, "distilled": {"top1": 47.0, "top5": 86.0}},
    "0.1": {"num_labelled": 6000, "baseline": {"top1": 50.0, "top5": 90.0}, "linear_eval": {"top1": 55.0, "top5": 91.0},
            "finetuned": {"top1": 60.0, "top5": 93.0}, "distilled": {"top1": 61.0, "top5": 94.0}}},
    "wall_time_s": 123.4}


@pytest.fixture()
def pipeline_dir(tmp_path):
    run = tmp_path / "pipeline-x"
    _write_metrics(run / "pretrain", _pretrain_records())
    for fraction in ("0.01", "0.1"):
        for stage in ("finetune", "distill", "baseline"):
            _write_metrics(run / f"labels-{fraction}" / stage,
                           [{"kind": "step", "step": s, "loss": 1.0 / s, "learning_rate": 0.1} for s in (1, 2, 3)])
        _write_metrics(run / f"labels-{fraction}" / "linear_eval", [{"kind": "final", "step": 0, "top1": 40.0}])
    (run / "report.json").write_text(json.dumps(REPORT))
    return run


def test_curve_series_keeps_finite_numbers_per_kind():
    series = curve_series(_pretrain_records(), "loss")
    assert list(series) == ["step"]
    assert series["step"][0] == list(range(1, 9))  # the "nan" string at step 9 is dropped
    assert series["step"][1][1] == pytest.approx(2.5)
    assert curve_series(_pretrain_records(), "linear_eval_top1") == {"epoch": ([4, 8], [31.0, 42.5])}
    assert curve_series([{"kind": "step", "step": 1, "loss": True}], "loss") == {}


def test_stages_set_aside_as_stale_are_not_reported(pipeline_dir, tmp_path):
    import shutil

    run = tmp_path / "pipe"
    shutil.copytree(pipeline_dir, run)
    shutil.copytree(run / "labels-0.01" / "finetune", run / "labels-0.01" / "finetune.stale-1")
    labels = [label for label, _ in find_metric_runs(run)]
    assert "labels-0.01/finetune" in labels and not [label for label in labels if ".stale-" in label]


def test_pipeline_folder_report(pipeline_dir):
    labels = [label for label, _ in find_metric_runs(pipeline_dir)]
    assert labels[0] == "pretrain" and "labels-0.01/finetune" in labels and len(labels) == 9
    page, pngs = write_html_report(pipeline_dir)
    assert page == pipeline_dir / "report.html"
    names = sorted(p.name for p in pngs)
    # linear_eval logs no curve metric: no figure for it
    assert names == sorted(["accuracy.png", "pretrain.png"] + [f"labels-{f}__{s}.png" for f in ("0.01", "0.1")
                                                               for s in ("baseline", "distill", "finetune")])
    for png in pngs:
        assert png.parent == pipeline_dir / FIGURE_DIR and png.read_bytes().startswith(PNG_MAGIC)
    text = page.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == len(pngs)
    assert all(base64.b64decode(data).startswith(PNG_MAGIC) for data in images)
    assert "45.2 / 85.0" in text and "61.0 / 94.0" in text and "1 % (600 labels)" in text
    assert "No loss, accuracy or learning-rate records" in text  # the linear_eval stages
    assert "src=\"http" not in text and "<link" not in text  # self-contained
    assert "| Fine-tuned (teacher) | 45.2 / 85.0 | 60.0 / 93.0 |" in pipeline_table(REPORT)


def test_single_stage_run_and_command(tmp_path, capsys):
    run = tmp_path / "pretrain-1"
    _write_metrics(run, _pretrain_records())
    out = tmp_path / "elsewhere.html"
    assert cli.main(["report", str(run), "--out", str(out)]) == 0
    assert "1 figure(s)" in capsys.readouterr().out
    assert out.stat().st_size > 1000 and (run / FIGURE_DIR / "pretrain-1.png").stat().st_size > 1000
    assert "Accuracy on the held-out split" not in out.read_text()


def test_nothing_to_report(tmp_path, capsys):
    with pytest.raises(ReportError, match="no metrics.jsonl and no report.json"):
        write_html_report(tmp_path)
    assert cli.main(["report", str(tmp_path / "absent")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_seeds_are_summarised_by_mean_and_sample_sd_with_each_seeds_values(tmp_path):
    from simclrv2.engine.report import summarise_seeds, write_pipeline_report

    def seed_result(shift):
        entry = {stage: {"top1": v["top1"] + shift, "top5": v["top5"]} for stage, v in REPORT["label_fractions"]["0.01"].items()
                 if stage != "num_labelled"}
        return {"label_fractions": {"0.01": {"num_labelled": 600, **entry}}, "wall_time_s": 10.0 + shift}

    report = summarise_seeds({"0": seed_result(0.0), "1": seed_result(2.0), "2": seed_result(4.0)})
    finetuned = report["label_fractions"]["0.01"]["finetuned"]
    assert finetuned["top1"] == pytest.approx(47.25) and finetuned["top1_sd"] == pytest.approx(2.0)  # sd of 0, 2, 4
    assert finetuned["top1_seeds"] == [45.25, 47.25, 49.25] and finetuned["top5_sd"] == 0.0
    gain = report["label_fractions"]["0.01"]["distilled_minus_finetuned"]
    assert gain["top1"] == pytest.approx(1.75) and gain["top1_sd"] == 0.0  # computed seed by seed
    assert report["seeds"] == [0, 1, 2] and report["per_seed"]["1"]["wall_time_s"] == 12.0
    table = pipeline_table(report)
    assert "| Fine-tuned (teacher) | 47.2 ± 2.0 / 85.0 ± 0.0 |" in table
    assert "| Distilled minus fine-tuned (top-1) | **+1.8 ± 0.0** |" in table
    write_pipeline_report({**report, "wall_time_s": 36.0}, tmp_path)
    assert "seed 2: 14 s" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").read_bytes().startswith(PNG_MAGIC)
    one = summarise_seeds({"5": seed_result(0.0)})
    assert "±" not in pipeline_table(one) and one["label_fractions"]["0.01"]["finetuned"]["top1_sd"] == 0.0
