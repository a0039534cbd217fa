"""Typed run configuration: dataclasses with the paper's defaults, presets, files and flags.

Every stage has one top-level dataclass (``PretrainConfig``, ``FinetuneConfig``, ...). Values are
resolved in this order, later wins:

1. the dataclass defaults, taken from the paper and the official ``tf2/run.py`` flags;
2. a *preset* (``--preset``; ``auto`` picks one from ``--dataset``), which scales the run to the
   data, e.g. a ResNet-18 at width 0.25 for the 28 px embedded Fashion-MNIST set;
3. a JSON or YAML file (``--config FILE``), nested like the dataclasses;
4. command-line flags, named after the official flags with dashes (``--train-batch-size``).

The resolved configuration is saved as ``config.json`` beside every run's outputs.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """An impossible setting; the message names the option and what to do."""


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field whose ``help`` becomes the command-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class ModelConfig:
    """Encoder and projection head (paper section 2, Table 1; official ``resnet.py``/``model.py``)."""

    resnet_depth: int = _opt(50, "ResNet depth: 18, 34, 50, 101, 152 or 200.")
    width_multiplier: float = _opt(1.0, "Channel width multiplier; fractions (0.25) give tiny CPU models.")
    sk_ratio: float = _opt(0.0, "Selective-kernel ratio; > 0 also turns on the ResNet-D stem and shortcut (paper: 0.0625).")
    cifar_stem: Optional[bool] = _opt(None, "3x3 stride-1 stem without max-pool; default: on for images of 32 px or less.")
    num_proj_layers: int = _opt(3, "Projection-head depth (SimCLRv2: 3).")
    proj_out_dim: int = _opt(128, "Projection output dimension.")
    ft_proj_selector: int = _opt(1, "Head layer that fine-tuning starts from: 0 = encoder output, 1 = after the first head layer (paper), -1 = last.")

    def spec(self, image_size: int, num_classes: Optional[int]):
        """The :class:`~simclrv2.models.ModelSpec` these options build for ``image_size`` px images
        and ``num_classes`` classes (CIFAR stem at <= 32 px unless set)."""
        from simclrv2.models import ModelSpec

        cifar_stem = image_size <= 32 if self.cifar_stem is None else self.cifar_stem
        return ModelSpec(**{**dataclasses.asdict(self), "cifar_stem": cifar_stem, "num_classes": num_classes})


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are augmented (official ``data.py``/``data_util.py``)."""

    dataset: str = _opt("embedded", "embedded (Fashion-MNIST), fashion_mnist, cifar10, cifar100, stl10 or folder.")
    data_dir: Optional[str] = _opt(None, "Folder with the dataset's files (default: the dataset's standard location).")
    image_size: Optional[int] = _opt(None, "Training image size in pixels; default: the dataset's native size (224 for folders).")
    subset: Optional[int] = _opt(None, "Use only the first N training images (after a seeded shuffle), for quick trials.")
    eval_split: str = _opt("test", "Labelled split used for evaluation; val holds out --val-fraction of each class of "
                                   "the training split for choosing settings (then nothing trains on those images).")
    val_fraction: float = _opt(0.1, "Share of each class of the training split that forms the val split (--eval-split val).")
    pretrain_split: str = _opt("train", "Split of unlabeled images for pretraining and distillation (stl10: unlabeled).")
    augmentation: str = _opt("batched", "batched: per-image random augmentation of whole tensor batches (fast); torchvision: classic per-image PIL pipeline.")
    crop_min_area: float = _opt(0.08, "Smallest random crop, as a share of the image area, in pretraining, fine-tuning and distillation (official: 0.08).")
    color_jitter_strength: float = _opt(1.0, "Colour distortion strength s (paper: 1.0 on ImageNet, 0.5 on CIFAR).")
    use_blur: Optional[bool] = _opt(None, "Gaussian blur during pretraining; default: on for images larger than 32 px (official).")
    num_workers: Optional[int] = _opt(None, "DataLoader workers for image folders; default: this process's share of the CPUs (at most 32).")
    skip_bad_images: bool = _opt(False, "Skip unreadable images and count them instead of stopping with an error.")
    eval_batch_size: int = _opt(256, "Batch size for evaluation.")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule (official ``build_optimizer``, ``WarmUpAndCosineDecay``)."""

    optimizer: str = _opt("lars", "lars, momentum (SGD with Nesterov momentum) or adam.")
    learning_rate: float = _opt(0.075, "Base learning rate, scaled by --learning-rate-scaling with the global batch size.")
    learning_rate_scaling: str = _opt("sqrt", "linear: lr * B / 256; sqrt: lr * sqrt(B).")
    warmup_epochs: float = _opt(10.0, "Epochs of linear warm-up before the cosine decay.")
    weight_decay: float = _opt(1e-4, "Weight decay (LARS: in the update; excluded for BN, biases and the supervised head).")
    momentum: float = _opt(0.9, "Momentum.")
    train_batch_size: int = _opt(4096, "Global batch size, summed over all processes.")
    train_epochs: float = _opt(800.0, "Epochs to train for.")
    train_steps: int = _opt(0, "Steps to train for; overrides --train-epochs when > 0.")


@dataclass(frozen=True)
class RuntimeConfig:
    """Devices, precision, run directory, checkpoints and logging."""

    run_dir: Optional[str] = _opt(None, "Output folder; default: runs/<stage>-<time> in the current folder.")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N.")
    precision: str = _opt("auto", "auto (bf16 where the device has it natively; else fp16 on GPUs, fp32 on "
                                  "CPUs), fp32, bf16 or fp16 (CUDA only).")
    channels_last: Optional[bool] = _opt(None, "Use channels-last memory format; default: on.")
    compile: bool = _opt(False, "Compile the model with torch.compile.")
    seed: int = _opt(0, "Random seed.")
    max_steps: Optional[int] = _opt(None, "Stop after this many steps (the schedule still follows --train-epochs).")
    resume: bool = _opt(True, "Continue from the newest valid checkpoint in the run folder, if there is one.")
    checkpoint_steps: int = _opt(500, "Save a checkpoint every N steps (and at each epoch end).")
    keep_checkpoint_max: int = _opt(3, "Number of step checkpoints to keep.")
    log_every_steps: int = _opt(10, "Write training metrics every N steps.")
    num_threads: Optional[int] = _opt(None, "CPU threads for PyTorch; default: the number of usable cores.")
    on_nonfinite: str = _opt("stop", "What a non-finite loss does: stop (keep the last good checkpoint) or skip (skip the step and count it).")
    max_skipped_steps: int = _opt(100, "With --on-nonfinite skip: stop (exit 3) once more than this many steps of the run have been skipped.")
    global_bn: bool = _opt(True, "Synchronise batch-norm statistics across processes (paper: global BN).")
    progress: bool = _opt(True, "Show a progress bar.")


@dataclass(frozen=True)
class LabelConfig:
    """Which labelled examples fine-tuning and linear evaluation may use (paper section 3); give
    only one of the three options."""

    label_fraction: Optional[float] = _opt(None, "Fraction of each class that is labelled, in (0, 1] (0.01 = 1 %, 1 = all labels).")
    labels_per_class: Optional[int] = _opt(None, "Exact number of labelled images per class (instead of --label-fraction).")
    label_file: Optional[str] = _opt(None, "File of image ids to use as labels, official ImageNet 1percent.txt format (instead of --label-fraction).")


@dataclass(frozen=True)
class StageConfig:
    """What every stage's config carries besides its options: the dotted names of the options the
    user set (file or flags), e.g. ``model.resnet_depth``, filled in once by :func:`resolve`."""

    explicit: frozenset = field(default=frozenset(), repr=False, compare=False, metadata={"internal": True})


@dataclass(frozen=True)
class PretrainConfig(StageConfig):
    """Stage 1: task-agnostic contrastive pretraining (paper section 2, Figure 3 left)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    temperature: float = _opt(0.1, "NT-Xent temperature (paper: 0.1).")
    hidden_norm: bool = _opt(True, "L2-normalise projections before the contrastive loss.")
    lineareval_while_pretraining: bool = _opt(True, "Train a linear head on stop-gradient features and report it (official).")
    use_memory: bool = _opt(False, "MoCo-style memory: momentum encoder and a queue of negatives (paper appendix D).")
    memory_size: int = _opt(65536, "Number of negatives kept in the memory queue.")
    memory_momentum: float = _opt(0.999, "EMA decay of the momentum encoder.")


@dataclass(frozen=True)
class FinetuneConfig(StageConfig):
    """Stage 2: supervised fine-tuning on few labels from a middle head layer (paper section 2)."""

    checkpoint: Optional[str] = _opt(None, "Pretrained checkpoint (a .pt file or a run folder); none trains the --resnet-depth/... model from scratch (supervised baseline).")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        learning_rate=0.005, learning_rate_scaling="sqrt", warmup_epochs=0.0, weight_decay=0.0,
        train_batch_size=1024, train_epochs=60.0))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    labels: LabelConfig = field(default_factory=lambda: LabelConfig(label_fraction=0.01))
    fine_tune_after_block: int = _opt(-1, "-1 trains everything; k in 0..4 freezes the stem (0) and block groups up to k.")
    zero_init_logits_layer: bool = _opt(True, "Start the classifier from zero weights (official fine-tuning setting).")


@dataclass(frozen=True)
class StudentConfig:
    """Student architecture for distillation; every unset option copies the teacher (self-distillation)."""

    resnet_depth: Optional[int] = _opt(None, "Student ResNet depth (default: the teacher's).")
    width_multiplier: Optional[float] = _opt(None, "Student width multiplier (default: the teacher's).")
    sk_ratio: Optional[float] = _opt(None, "Student SK ratio (default: the teacher's).")
    num_proj_layers: Optional[int] = _opt(None, "Student projection-head depth (default: the teacher's).")
    ft_proj_selector: Optional[int] = _opt(None, "Student head layer under the classifier (default: the teacher's).")


@dataclass(frozen=True)
class DistillConfig(StageConfig):
    """Stage 3: distillation with unlabeled data (paper section 2, equations 2-3)."""

    checkpoint: Optional[str] = _opt(None, "Fine-tuned teacher checkpoint (a .pt file or a run folder).")
    student: StudentConfig = field(default_factory=lambda: StudentConfig())
    student_init: Optional[str] = _opt(None, "Start the student from this checkpoint's encoder and head (e.g. the pretrained one) instead of random weights.")
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(train_epochs=400.0))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    labels: LabelConfig = field(default_factory=lambda: LabelConfig(label_fraction=0.01))
    distill_temperature: float = _opt(1.0, "Temperature tau of the teacher and student softmax (paper: 1).")
    distill_alpha: float = _opt(1.0, "Weight of the distillation loss; 1 - alpha goes to the labelled cross-entropy (paper default: 1).")


@dataclass(frozen=True)
class LinearEvalConfig(StageConfig):
    """Linear evaluation: a linear classifier on frozen features (official README)."""

    checkpoint: Optional[str] = _opt(None, "Checkpoint whose encoder is evaluated (a .pt file or a run folder).")
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        optimizer="momentum", learning_rate=0.1, learning_rate_scaling="linear", warmup_epochs=0.0,
        weight_decay=0.0, train_batch_size=512, train_epochs=90.0))
    runtime: RuntimeConfig = field(default_factory=lambda: RuntimeConfig(global_bn=False))
    labels: LabelConfig = field(default_factory=lambda: LabelConfig(label_fraction=1.0))
    ft_proj_selector: int = _opt(0, "Features to evaluate: 0 = encoder output, k = after head layer k.")


@dataclass(frozen=True)
class EvaluateConfig(StageConfig):
    """Top-1 / top-5 accuracy of a checkpoint on a labelled split."""

    checkpoint: Optional[str] = _opt(None, "Checkpoint to evaluate (a .pt file or a run folder).")
    data: DataConfig = field(default_factory=DataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


@dataclass(frozen=True)
class PipelineConfig(StageConfig):
    """Pretrain -> fine-tune -> distill, a supervised baseline, and a report (paper Figure 3)."""

    data: DataConfig = field(default_factory=DataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    seeds: list = _opt([0], "Seeds of repeated runs of the whole pipeline (each in RUN_DIR/seed-K), e.g. 0,1,2; the report gives each seed's numbers and their mean and standard deviation.")
    label_fractions: list = _opt([0.01, 0.1], "Fractions of the training set that are labelled, one column of the report each.")
    labels_per_class: list = _opt([], "Exact labelled counts per class, reported as their fraction of the training set.")
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    linear_eval: LinearEvalConfig = field(default_factory=LinearEvalConfig)
    baseline: FinetuneConfig = field(default_factory=FinetuneConfig)


STAGE_CONFIGS: dict[str, type] = {
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "distill": DistillConfig,
    "linear-eval": LinearEvalConfig,
    "evaluate": EvaluateConfig,
    "pipeline": PipelineConfig,
}

# Sections whose flags carry no prefix: ``--train-batch-size`` rather than ``--optim.train-batch-size``.
FLAT_SECTIONS = {"model", "data", "optim", "runtime", "labels"}
# Inside the pipeline these come from the pipeline itself, so its stages get no flags for them
# (nor do fine-tuning's and the baseline's architectures, which follow pretraining's).
PIPELINE_DERIVED = {"data", "runtime", "labels", "checkpoint", "student_init"}


# --------------------------------------------------------------------------------------------
# Presets: the paper's ImageNet recipe is the dataclass default; these scale it to other data.
# --------------------------------------------------------------------------------------------

_EMBEDDED_MODEL = {"resnet_depth": 18, "width_multiplier": 0.25, "sk_ratio": 0.0, "cifar_stem": True}
_EMBEDDED_RUNTIME = {"checkpoint_steps": 200, "log_every_steps": 10}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "imagenet": {},
    # Scratch-calibrated on 2 CPU cores: a 1.2 M-parameter ResNet-18 at width 0.25 on 28 px
    # Fashion-MNIST; the whole pipeline runs in minutes (see README, results).
    "embedded": {
        # ImageNet's 1 % is about 13 labels per class: report 10 per class and 1 % (60 per class).
        "pipeline": {"labels_per_class": [10], "label_fractions": [0.01]},
        # Every value below was chosen on the val split (docs/tuning.md). Pretraining: crops of at
        # least a quarter of the 28 px image and colour strength 0.5 (brightness and contrast
        # only, on grey images); 4 epochs: with the label stages below, about 15 minutes a seed on
        # 2 cores of an Intel Xeon with AMX, 22 on an AMD EPYC (docs/tuning.md, result on the test split).
        "pretrain": {
            "model": _EMBEDDED_MODEL, "temperature": 0.2, "runtime": _EMBEDDED_RUNTIME,
            "data": {"crop_min_area": 0.25, "color_jitter_strength": 0.5},
            "optim": {"train_batch_size": 256, "train_epochs": 4, "learning_rate": 0.075,
                      "learning_rate_scaling": "sqrt", "warmup_epochs": 0.5, "weight_decay": 1e-4},
        },
        # The fine-tune and the baseline searched the same eight settings (lr x epochs x crop);
        # each keeps the one with the best mean over the two label amounts.
        "finetune": {
            "model": _EMBEDDED_MODEL, "runtime": _EMBEDDED_RUNTIME, "data": {"crop_min_area": 0.25},
            "optim": {"train_batch_size": 64, "train_epochs": 200, "learning_rate": 0.02,
                      "learning_rate_scaling": "sqrt", "warmup_epochs": 0, "weight_decay": 0.0},
        },
        "baseline": {
            "model": _EMBEDDED_MODEL, "runtime": _EMBEDDED_RUNTIME, "data": {"crop_min_area": 0.25},
            "optim": {"train_batch_size": 64, "train_epochs": 200, "learning_rate": 0.08,
                      "learning_rate_scaling": "sqrt", "warmup_epochs": 0, "weight_decay": 1e-4},
        },
        # Two epochs over all unlabeled images, the student starting from the pretrained network.
        "distill": {
            "runtime": _EMBEDDED_RUNTIME, "data": {"crop_min_area": 0.25},
            "optim": {"train_batch_size": 256, "train_epochs": 2, "learning_rate": 0.1,
                      "learning_rate_scaling": "sqrt", "warmup_epochs": 0.1, "weight_decay": 1e-4},
        },
        "linear-eval": {
            "runtime": _EMBEDDED_RUNTIME,
            "optim": {"train_batch_size": 256, "train_epochs": 20, "learning_rate": 0.1,
                      "learning_rate_scaling": "linear", "warmup_epochs": 0, "weight_decay": 0.0},
        },
    },
    # Paper appendix B.9 (CIFAR-10): ResNet-50 with the CIFAR stem, batch 1024, T = 0.5, s = 0.5.
    "cifar": {
        "pretrain": {
            "model": {"cifar_stem": True}, "temperature": 0.5, "data": {"color_jitter_strength": 0.5},
            "optim": {"train_batch_size": 1024, "train_epochs": 800, "learning_rate": 1.0,
                      "learning_rate_scaling": "linear", "weight_decay": 1e-6},
        },
    },
}

DATASET_PRESET = {"embedded": "embedded", "fashion_mnist": "embedded", "cifar10": "cifar", "cifar100": "cifar"}


def preset_name(preset: str, dataset: str) -> str:
    """The preset ``--preset`` names (``auto``: the one of ``dataset``)."""
    return DATASET_PRESET.get(dataset, "imagenet") if preset == "auto" else preset


def preset_overrides(preset: str, stage: str, dataset: str) -> dict[str, Any]:
    """Overrides a preset makes to one stage's config (``auto`` picks the dataset's preset)."""
    preset = preset_name(preset, dataset)
    if preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r}; choose auto or one of {sorted(PRESETS)}")
    table = PRESETS[preset]
    if stage == "pipeline":
        stages = {name: table.get(name.replace("_", "-"), {}) for name in
                  ("pretrain", "finetune", "distill", "linear_eval", "baseline")}
        runtime = table.get("pretrain", {}).get("runtime", {})
        return {**stages, **table.get("pipeline", {}), **({"runtime": runtime} if runtime else {})}
    return table.get(stage, {})


# --------------------------------------------------------------------------------------------
# Converting between dataclasses, dicts, files and flags.
# --------------------------------------------------------------------------------------------

def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config dataclass: its options, as ``config.json`` holds them."""
    return {f.name: to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
            for f in _options(type(cfg)) for value in [getattr(cfg, f.name)]}


def _options(cls: type) -> list[dataclasses.Field]:
    """The fields of a config class that are options (not what resolving records)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def merge(cfg: Any, overrides: dict[str, Any], where: str = "") -> Any:
    """A copy of the dataclass ``cfg`` with nested ``overrides`` applied; unknown keys are errors."""
    types = {f.name: _field_types(type(cfg))[f.name] for f in _options(type(cfg))}
    changes = {}
    for key, value in overrides.items():
        name = key.replace("-", "_")
        if name not in types:
            raise ConfigError(f"{where or 'config'}: unknown option {key!r}; known: {sorted(types)}")
        if _is_config(types[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key}: expected a section (mapping), got {value!r}")
            changes[name] = merge(changes.get(name, getattr(cfg, name)), value, f"{where}{key}.")
        else:
            changes[name] = _coerce(value, types[name], flag_name(f"{where}{key}"))
    return dataclasses.replace(cfg, **changes)


def flag_name(dotted: str) -> str:
    """The command-line flag of a nested option: ``optim.train_batch_size`` -> ``train-batch-size``."""
    *sections, leaf = dotted.split(".")
    kept = [s for s in sections if s not in FLAT_SECTIONS]
    return ".".join(kept + [leaf]).replace("_", "-")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` (from a flag, a file or Python) as the option's type; numbers must be finite, as
    NaN would pass every range check (all comparisons with NaN are false)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    flag = f"--{name.replace('_', '-')}"
    if value is None:
        raise ConfigError(f"{flag}: a value is required")
    try:
        if tp is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(value)
                return lowered in {"true", "1", "yes"}
            return bool(value)
        if tp is str:
            return str(value)
        if tp in (int, float):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return _finite(tp(value), flag)
        if tp is list or typing.get_origin(tp) is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [_finite(_number(v), flag) for v in items if v != ""]
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{flag}: {value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


def _number(value: Any) -> Any:
    """An int where the text or value is one, else a float (list options: ``0.01,0.1`` or ``10``)."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(value)
    return value


def _finite(value: Any, flag: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {value}")
    return value


def load_config_file(path: str) -> dict[str, Any]:
    """Read a nested JSON or YAML config file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {path} is not UTF-8 text; pass a JSON or YAML file") from None
    if p.suffix in {".yaml", ".yml"}:
        try:
            import yaml
        except ImportError:
            raise ConfigError("--config: reading YAML needs PyYAML (pip install pyyaml), or use a .json file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            first = str(err).strip().splitlines()[0]
            raise ConfigError(f"--config: {path} is not valid YAML ({first})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--config: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of options")
    return data


def _walk_flags(cfg: Any, prefix: str = "", path: tuple[str, ...] = ()):
    """Yield ``(flag, path, type, value, help)`` for every leaf option of a config instance."""
    cls = type(cfg)
    for f in _options(cls):
        tp = _field_types(cls)[f.name]
        if prefix and (f.name in PIPELINE_DERIVED or (cls is FinetuneConfig and f.name == "model")):
            continue
        if _is_config(tp):
            sub_prefix = prefix if f.name in FLAT_SECTIONS else f"{prefix}{f.name.replace('_', '-')}."
            yield from _walk_flags(getattr(cfg, f.name), sub_prefix, path + (f.name,))
        else:
            yield (f"--{prefix}{f.name.replace('_', '-')}", path + (f.name,), tp,
                   getattr(cfg, f.name), f.metadata.get("help", ""))


def default_preset() -> str:
    """The preset of a run without ``--preset``: the one ``auto`` picks for the default ``--dataset``."""
    return preset_name("auto", DataConfig().dataset)


def add_config_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    """Add one flag per option of ``stage``'s config; values stay ``None`` unless given.

    The help shows the defaults of a run without ``--preset`` (those of :func:`default_preset`),
    and marks the ones that preset changes. On/off flags alone mean true (``--skip-bad-images``).
    """
    preset, paper = default_preset(), STAGE_CONFIGS[stage]()
    defaults = merge(STAGE_CONFIGS[stage](), preset_overrides(preset, stage, DataConfig().dataset))
    parser.add_argument("--config", default=None, help="JSON or YAML file of options, nested like the saved config.json.")
    parser.add_argument("--preset", default="auto", help="Defaults scaled to the data: auto (the preset of --dataset: "
                        f"{', '.join(f'{d} -> {p}' for d, p in DATASET_PRESET.items())}, else imagenet) or one of "
                        f"{', '.join(PRESETS)}. (default: auto)")
    seen: set[str] = set()
    for flag, path, tp, default, help_text in _walk_flags(defaults):
        if stage == "pipeline" and path == ("runtime", "seed"):
            continue  # the pipeline's seeds are --seeds
        if flag in seen:
            raise AssertionError(f"{stage}: two options share the flag {flag}")
        seen.add(flag)
        on_off = {"nargs": "?", "const": "true"} if _leaf_type(tp) is bool else {}
        parser.add_argument(flag, dest="cfg:" + ".".join(path), default=None, metavar=_metavar(tp),
                            help=_help_text(help_text, default, functools.reduce(getattr, path, paper), preset),
                            **on_off)


def _help_text(doc: str, default: Any, paper_default: Any, preset: str) -> str:
    """A field's doc with its default; ``%`` is escaped, as argparse %-formats help (no field
    doc uses ``%(default)s``: defaults are written here)."""
    doc = doc.replace("%", "%%")
    if default != paper_default:
        return f"{doc} (default: {default}, from the {preset} preset)"
    if default is None and "default" in doc.lower():  # the doc says what None does
        return doc
    return f"{doc} (default: {default})"


def _leaf_type(tp: Any) -> Any:
    """``X`` for ``Optional[X]``, else ``tp``."""
    if typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _metavar(tp: Any) -> str:
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR", list: "LIST"}.get(_leaf_type(tp), "VALUE")


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith("cfg:") or value is None:
            continue
        keys = dest[4:].split(".")
        node = nested
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return nested


def _flagged_dataset(args: argparse.Namespace, file_values: dict[str, Any]) -> str:
    dataset = vars(args).get("cfg:data.dataset")
    if dataset is None:
        data = file_values.get("data", {})
        if not isinstance(data, dict):
            raise ConfigError(f"--config: 'data' must be a mapping of data options, got {data!r}")
        dataset = data.get("dataset", DataConfig().dataset)
    return dataset


def _dotted_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in tree.items():
        name = prefix + key.replace("-", "_")
        keys |= _dotted_keys(value, name + ".") if isinstance(value, dict) else {name}
    return keys


ARCHITECTURE = ("resnet_depth", "width_multiplier", "sk_ratio", "cifar_stem", "num_proj_layers", "proj_out_dim")


def adopt_architecture(cfg: Any, spec: Any, checkpoint: str) -> Any:
    """``cfg`` with its model section set to the architecture of the checkpoint it starts from
    (a :class:`~simclrv2.models.ModelSpec`), so that the saved config describes the network
    trained; an architecture option the user set that disagrees with the checkpoint is an error."""
    for option in ARCHITECTURE:
        wanted, recorded = getattr(cfg.model, option), getattr(spec, option)
        if f"model.{option}" in cfg.explicit and wanted != recorded:
            flag = option.replace("_", "-")
            raise ConfigError(f"--{flag} {wanted} differs from the checkpoint {checkpoint} "
                              f"({flag} {recorded}); drop the flag or pass a matching --checkpoint")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **{k: getattr(spec, k) for k in ARCHITECTURE}))


LABEL_OPTIONS = ("label_fraction", "labels_per_class", "label_file")


def check_labels(labels: LabelConfig) -> None:
    """Refuse conflicting or impossible label options (one line, naming the flags)."""
    given = [f"--{name.replace('_', '-')} {getattr(labels, name)}" for name in LABEL_OPTIONS
             if getattr(labels, name) not in (None, "")]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} conflict: give only one of --label-fraction, --labels-per-class "
                          "or --label-file")
    if labels.label_fraction is not None and not 0 < labels.label_fraction <= 1:
        raise ConfigError(f"--label-fraction must be in (0, 1], got {labels.label_fraction:g}; 1 uses all labels")
    if labels.labels_per_class is not None and labels.labels_per_class < 1:
        raise ConfigError(f"--labels-per-class must be >= 1, got {labels.labels_per_class}")


def _finish(cfg: Any, *user_values: dict[str, Any]) -> Any:
    """``cfg`` with the user's values (file, then flags) and the names of the options they set."""
    for values in user_values:
        cfg = merge(cfg, values)
    cfg = dataclasses.replace(cfg, explicit=frozenset().union(*(_dotted_keys(v) for v in user_values)))
    labels = getattr(cfg, "labels", None)
    if isinstance(labels, LabelConfig):
        # A label option the user sets replaces the stage's default one (fine-tuning's 1 %).
        chosen = {name for name in LABEL_OPTIONS
                  if f"labels.{name}" in cfg.explicit and getattr(labels, name) not in (None, "")}
        if chosen:
            labels = dataclasses.replace(labels, **{name: None for name in set(LABEL_OPTIONS) - chosen})
            cfg = dataclasses.replace(cfg, labels=labels)
        check_labels(labels)
    return cfg


def resolve(stage: str, args: argparse.Namespace) -> Any:
    """Build a stage's config: defaults, then preset, then ``--config`` file, then flags."""
    cfg = STAGE_CONFIGS[stage]()
    file_values = load_config_file(args.config) if getattr(args, "config", None) else {}
    cfg = merge(cfg, preset_overrides(getattr(args, "preset", "auto"), stage, _flagged_dataset(args, file_values)))
    return _finish(cfg, file_values, _flag_overrides(args))


def build(stage: str, overrides: Optional[dict[str, Any]] = None, preset: str = "auto") -> Any:
    """Python entry point: a stage config from nested ``overrides`` on top of the preset."""
    cfg = STAGE_CONFIGS[stage]()
    overrides = overrides or {}
    dataset = overrides.get("data", {}).get("dataset", DataConfig().dataset)
    cfg = merge(cfg, preset_overrides(preset, stage, dataset))
    return _finish(cfg, overrides)


# --------------------------------------------------------------------------------------------
# Validation: every numeric option is checked before any work starts, one line naming its flag.
# --------------------------------------------------------------------------------------------
#
# Each test states what a valid value satisfies, so that NaN, which fails every comparison, fails it;
# ``prefix`` names a pipeline stage's flags (``--pretrain.temperature``).


def check_range(flag: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """Refuse ``value`` unless it is a finite number in the interval from ``low`` to ``high``."""
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (finite and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)):
        raise ConfigError(f"{flag} must be {_interval(low, high, low_open, high_open)}, got {value}")


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    def text(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"
    if high == math.inf:
        return "positive" if low == 0 and low_open else f">= {text(low)}"
    return f"in {'(' if low_open else '['}{text(low)}, {text(high)}{')' if high_open else ']'}"


def check_choice(flag: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def validate_optim(optim: OptimConfig, prefix: str = "") -> None:
    flag = f"--{prefix}"
    check_range(f"{flag}train-batch-size", optim.train_batch_size, 1)
    check_range(f"{flag}learning-rate", optim.learning_rate, 0, low_open=True)
    check_choice(f"{flag}learning-rate-scaling", optim.learning_rate_scaling, ("linear", "sqrt"))
    check_choice(f"{flag}optimizer", optim.optimizer, ("lars", "momentum", "adam"))
    check_range(f"{flag}train-epochs", optim.train_epochs, 0)
    check_range(f"{flag}train-steps", optim.train_steps, 0)
    if optim.train_epochs == 0 and optim.train_steps == 0:
        raise ConfigError(f"{flag}train-epochs or {flag}train-steps must be positive")
    check_range(f"{flag}warmup-epochs", optim.warmup_epochs, 0)
    check_range(f"{flag}weight-decay", optim.weight_decay, 0)
    check_range(f"{flag}momentum", optim.momentum, 0, 1, high_open=True)


def validate_runtime(runtime: RuntimeConfig) -> None:
    check_choice("--on-nonfinite", runtime.on_nonfinite, ("stop", "skip"))
    check_range("--seed", runtime.seed, 0, 2**32, high_open=True)  # NumPy's seed range
    check_range("--checkpoint-steps", runtime.checkpoint_steps, 1)
    check_range("--keep-checkpoint-max", runtime.keep_checkpoint_max, 1)
    check_range("--log-every-steps", runtime.log_every_steps, 1)
    if runtime.max_steps is not None:
        check_range("--max-steps", runtime.max_steps, 1)
    if runtime.num_threads is not None:
        check_range("--num-threads", runtime.num_threads, 1)


def validate_data(data: DataConfig) -> None:
    from simclrv2.data.batches import AUGMENTATIONS

    check_choice("--augmentation", data.augmentation, AUGMENTATIONS)
    for flag, value in (("--image-size", data.image_size), ("--subset", data.subset)):
        if value is not None:
            check_range(flag, value, 1)
    check_range("--color-jitter-strength", data.color_jitter_strength, 0)
    check_range("--crop-min-area", data.crop_min_area, 0, 1, low_open=True)
    check_range("--val-fraction", data.val_fraction, 0, 1, low_open=True, high_open=True)
    if data.num_workers is not None:
        check_range("--num-workers", data.num_workers, 0)
    check_range("--eval-batch-size", data.eval_batch_size, 1)


def validate_world(optim: OptimConfig, rt: Any) -> None:
    """The global batch must split evenly over the processes (``rt``: the stage's ``Runtime``)."""
    if optim.train_batch_size < rt.world_size:
        raise ConfigError(f"--train-batch-size {optim.train_batch_size} is smaller than the "
                          f"{rt.world_size} processes; give each process at least one image")
    if optim.train_batch_size % rt.world_size:
        raise ConfigError(f"--train-batch-size {optim.train_batch_size} must be divisible by the "
                          f"{rt.world_size} processes")


def validate_training(cfg: Any, prefix: str = "") -> None:
    """The sections every training stage has: data, optimiser, runtime and labels."""
    validate_data(cfg.data)
    validate_optim(cfg.optim, prefix)
    validate_runtime(cfg.runtime)
    if hasattr(cfg, "labels"):
        check_labels(cfg.labels)


def validate_architecture(prefix: str, resnet_depth: Optional[int], width_multiplier: Optional[float],
                          sk_ratio: Optional[float], num_proj_layers: Optional[int],
                          proj_out_dim: Optional[int] = None) -> None:
    """Architecture options (unset ones, None, are a student's copies of its teacher's)."""
    from simclrv2.models import RESNET_SPECS

    flag = f"--{prefix}"
    if resnet_depth is not None and resnet_depth not in RESNET_SPECS:
        raise ConfigError(f"{flag}resnet-depth {resnet_depth} is not supported; choose one of {sorted(RESNET_SPECS)}")
    if width_multiplier is not None:
        check_range(f"{flag}width-multiplier", width_multiplier, 1 / 64)  # one stem channel
    if sk_ratio is not None:
        check_range(f"{flag}sk-ratio", sk_ratio, 0)
    if num_proj_layers is not None:
        check_range(f"{flag}num-proj-layers", num_proj_layers, 0)
    if proj_out_dim is not None:
        check_range(f"{flag}proj-out-dim", proj_out_dim, 1)


def validate_model(model: ModelConfig, prefix: str = "") -> None:
    validate_architecture(prefix, model.resnet_depth, model.width_multiplier, model.sk_ratio, model.num_proj_layers,
                          model.proj_out_dim)


def validate_selector(selector: int, num_proj_layers: int, flag: str = "--ft-proj-selector") -> None:
    if not -1 <= selector <= num_proj_layers:
        raise ConfigError(f"{flag} {selector} is outside the head: use -1 or 0..{num_proj_layers} "
                          f"(the head has --num-proj-layers {num_proj_layers})")


def save_config(cfg: Any, run_dir: Path) -> Path:
    """Write the resolved config (a config dataclass or its dict) as ``config.json`` beside the
    run's outputs: atomically, replacing (never following) a link of that name."""
    from simclrv2.engine.checkpoint import write_json

    path = Path(run_dir) / "config.json"
    write_json(path, cfg if isinstance(cfg, dict) else to_dict(cfg))
    return path
