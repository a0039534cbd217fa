"""The whole method in one command: pretrain -> fine-tune -> distill, against a baseline.

For each amount of labels the pipeline runs linear evaluation of the pretrained encoder,
fine-tunes it, distills the fine-tuned teacher into a student on all unlabeled images, and trains
the same architecture from scratch on the same labels (the supervised-only baseline). The report
(``report.json``, ``report.md``, ``report.png``) shows what each stage bought (paper Figure 3).
Rerunning the command in the same run folder resumes where it stopped; a stage whose inputs
changed since (an earlier stage trained on) is set aside and run again.
"""
from __future__ import annotations

import copy
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Optional

from simclrv2 import distributed
from simclrv2.config import ConfigError, DataConfig, LabelConfig, PipelineConfig, save_config, validate_data, validate_runtime
from simclrv2.data.splits import load_split
from simclrv2.engine.report import summarise_seeds, write_pipeline_report
from simclrv2.engine.run_folder import StaleInputs, claim_run_folder, name_run_dir, releases_run_folders, set_aside
from simclrv2.engine.runtime import join_process_group
from simclrv2.stages import distill, finetune, linear_eval, pretrain

STAGE_KEYS = ("baseline", "linear_eval", "finetuned", "distilled")


def _label_settings(cfg: PipelineConfig) -> list[tuple[Optional[str], LabelConfig]]:
    """(report key, labels) for every requested amount; per-class counts get their key once the
    labelled fraction they amount to is known."""
    settings = []
    for count in cfg.labels_per_class:
        if not (float(count).is_integer() and count > 0):
            raise ConfigError(f"--labels-per-class values must be positive whole numbers, got {count}")
        settings.append((None, LabelConfig(labels_per_class=int(count))))
    for fraction in cfg.label_fractions:
        if not 0 < float(fraction) <= 1:
            raise ConfigError(f"--label-fractions values must be in (0, 1], got {fraction}")
        settings.append((f"{float(fraction):g}", LabelConfig(label_fraction=float(fraction))))
    if not settings:
        raise ConfigError("give at least one of --label-fractions or --labels-per-class")
    return settings


def _stage_data(stage_data: DataConfig, cfg: PipelineConfig) -> DataConfig:
    """The pipeline's data, except where the stage's preset differs from the defaults (the cifar
    preset's colour strength 0.5 for pretraining) and the user did not set that option."""
    default = DataConfig()
    own = {f.name: getattr(stage_data, f.name) for f in fields(DataConfig)
           if getattr(stage_data, f.name) != getattr(default, f.name) and f"data.{f.name}" not in cfg.explicit}
    return replace(cfg.data, **own)


def _stage_cfg(stage_cfg: Any, cfg: PipelineConfig, run_dir: Path, name: str, **overrides: Any) -> Any:
    """A stage's config with the pipeline's data and runtime and its own sub-folder."""
    return replace(stage_cfg, data=_stage_data(stage_cfg.data, cfg),
                   runtime=replace(cfg.runtime, run_dir=str(run_dir / name)), **overrides)


def _label_stages(cfg: PipelineConfig, run_dir: Path, labels: LabelConfig, folder: str) -> dict[str, Any]:
    """The configs of the stages run for one amount of labels, in ``run_dir/folder``.

    A same-size student starts from the pretrained network, so that a short distillation on a
    CPU budget can keep up with its teacher; a smaller student starts from random weights.
    """
    pretrained, stage_dir = str(run_dir / "pretrain"), run_dir / folder
    self_distillation = all(value is None for value in vars(cfg.distill.student).values())
    return {
        "linear_eval": _stage_cfg(cfg.linear_eval, cfg, stage_dir, "linear_eval", labels=labels,
                                  checkpoint=pretrained),
        "finetune": _stage_cfg(cfg.finetune, cfg, stage_dir, "finetune", labels=labels, checkpoint=pretrained),
        "distill": _stage_cfg(cfg.distill, cfg, stage_dir, "distill", labels=labels,
                              checkpoint=str(stage_dir / "finetune"),
                              student_init=pretrained if self_distillation else None),
        "baseline": _stage_cfg(cfg.baseline, cfg, stage_dir, "baseline", labels=labels, checkpoint=None,
                               model=cfg.pretrain.model),
    }


def _folder(key: Optional[str], labels: LabelConfig) -> str:
    return f"labels-{labels.labels_per_class}-per-class" if key is None else f"labels-{key}"


def _seeds(cfg: PipelineConfig) -> list[int]:
    if "runtime.seed" in cfg.explicit:
        raise ConfigError("the pipeline takes --seeds (e.g. --seeds 1 or --seeds 0,1,2), not --seed")
    if not cfg.seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. --seeds 0")
    for seed in cfg.seeds:
        if not (float(seed).is_integer() and 0 <= seed < 2**32):
            raise ConfigError(f"--seeds values must be whole numbers in [0, 2**32), got {seed}")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"--seeds repeats a seed: {','.join(f'{s:g}' for s in cfg.seeds)}; give each once")
    return [int(seed) for seed in cfg.seeds]


def validate(cfg: PipelineConfig, run_dir: Path) -> None:
    """Every stage's settings, checked before pretraining starts (flags named as the pipeline's)."""
    _seeds(cfg)
    validate_data(cfg.data)
    validate_runtime(cfg.runtime)
    pretrain.validate(_stage_cfg(cfg.pretrain, cfg, run_dir, "pretrain"), "pretrain.")
    for key, labels in _label_settings(cfg):
        stages = _label_stages(cfg, run_dir, labels, _folder(key, labels))
        linear_eval.validate(stages["linear_eval"], "linear-eval.")
        finetune.validate(stages["finetune"], "finetune.")
        distill.validate(stages["distill"], "distill.")
        finetune.validate(stages["baseline"], "baseline.")


def _run_stage(run: Callable[..., dict[str, Any]], cfg: Any, **kwargs: Any) -> dict[str, Any]:
    """Run a stage in its sub-folder. If the run there started from other inputs (an earlier stage
    went on since, e.g. under a larger --max-steps), its folder is kept as ``<name>.stale-<k>``
    and the stage runs afresh: a result computed from older inputs is never reused, nor deleted."""
    try:
        return run(copy.deepcopy(cfg), **kwargs)
    except StaleInputs as err:
        if distributed.is_main():
            kept = set_aside(Path(cfg.runtime.run_dir))
            print(f"note: {cfg.runtime.run_dir} started from other inputs ({'; '.join(err.changes)}); kept it as "
                  f"{kept.name} and running the stage again")
        distributed.barrier()
        return run(copy.deepcopy(cfg), **kwargs)


def _run_seed(cfg: PipelineConfig, seed_dir: Path, num_train: int) -> dict[str, Any]:
    """Every stage for one seed, in ``seed_dir``; returns that seed's results."""
    start = time.perf_counter()
    pre = _run_stage(pretrain.run, _stage_cfg(cfg.pretrain, cfg, seed_dir, "pretrain"))
    results: dict[str, dict[str, Any]] = {}
    for key, labels in _label_settings(cfg):
        stages = _label_stages(cfg, seed_dir, labels, _folder(key, labels))
        le = _run_stage(linear_eval.run, stages["linear_eval"])
        ft = _run_stage(finetune.run, stages["finetune"])
        ds = _run_stage(distill.run, stages["distill"])
        bl = _run_stage(finetune.run, stages["baseline"], stage="baseline")
        fraction = ft["num_labelled"] / num_train
        report_key = key if key is not None else f"{round(fraction, 6):g}"
        results[report_key] = {
            "num_labelled": ft["num_labelled"],
            **{name: {"top1": r["top1"], "top5": r["top5"]} for name, r in
               zip(STAGE_KEYS, (bl, le, ft, ds))},
        }
    return {"label_fractions": results, "wall_time_s": round(time.perf_counter() - start, 1),
            "pretrain": {k: pre[k] for k in ("step", "linear_eval_top1") if k in pre}}


@releases_run_folders
def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage once per seed (in ``RUN_DIR/seed-K``) and write the report of their mean
    and spread; returns the report dict. The pipeline holds its folder's lock throughout, each
    stage its sub-folder's."""
    start = time.perf_counter()
    join_process_group(cfg.runtime.device)  # under torchrun: one process group for all stages; rank 0 writes
    run_dir = name_run_dir(cfg.runtime.run_dir, "pipeline", distributed.is_main())
    cfg = replace(cfg, runtime=replace(cfg.runtime, run_dir=str(run_dir)))
    validate(cfg, run_dir)
    claim_run_folder(run_dir, "pipeline", cfg, {})
    if distributed.is_main():
        save_config(cfg, run_dir)

    num_train = len(load_split(cfg.data, "train"))  # without --eval-split val's held-out images
    if cfg.data.subset is not None:
        num_train = min(num_train, cfg.data.subset)
    per_seed = {}
    for seed in _seeds(cfg):
        seeded = replace(cfg, runtime=replace(cfg.runtime, seed=seed))
        per_seed[str(seed)] = _run_seed(seeded, run_dir / f"seed-{seed}", num_train)
    report = {**summarise_seeds(per_seed), "wall_time_s": round(time.perf_counter() - start, 1)}
    if distributed.is_main():
        write_pipeline_report(report, run_dir)
    return report
