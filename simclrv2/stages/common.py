"""Pieces the stages share: run folders, data, optimisers, schedules and checkpointed models."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from simclrv2 import data as D
from simclrv2.distributed import broadcast_object
from simclrv2.data.batches import native_image_size
from simclrv2.config import ConfigError, DataConfig, LabelConfig, ModelConfig, OptimConfig, RuntimeConfig, check_labels
from simclrv2.data.datasets import dataset_splits
from simclrv2.engine.checkpoint import CHECKPOINT_DIR, CheckpointError, load_checkpoint, resolve_checkpoint, step_checkpoints
from simclrv2.engine.run_folder import checkpoint_identity, claim
from simclrv2.engine.runtime import Runtime
from simclrv2.models import SimCLRv2Model, build_simclrv2_model
from simclrv2.optim import LARS, lars_param_groups, num_train_steps, warmup_cosine_lr

# ----------------------------------------------------------------------------- run folders


def make_run_dir(runtime: RuntimeConfig, stage: str, rt: Runtime) -> Path:
    """The run folder (``runs/<stage>-<time>`` by default), created on the main rank."""
    if runtime.run_dir is None:
        stamp = broadcast_object(time.strftime("%Y%m%d-%H%M%S"))  # one folder for all ranks
        runtime.run_dir = str(Path("runs") / f"{stage}-{stamp}")
        if rt.is_main:
            print(f"writing to {runtime.run_dir}")
    path = Path(runtime.run_dir)
    if rt.is_main:
        path.mkdir(parents=True, exist_ok=True)
    return path


def claim_run_folder(run_dir: Path, command: str, cfg: Any, inputs: dict[str, Any], is_main: bool,
                     trains: bool = False) -> None:
    """The main rank locks the folder for this run's life and checks that the run may work there
    (:mod:`simclrv2.engine.run_folder`); every rank raises its verdict (only rank 0 locks)."""
    error = None
    if is_main:
        try:
            claim(run_dir, command, asdict(cfg), inputs, trains)
        except ConfigError as err:
            error = err
    error = broadcast_object(error)
    if error is not None:
        raise error


def start_run(cfg: Any, stage: str, rt: Runtime, inputs: Optional[dict[str, Any]] = None) -> Path:
    """Create and claim the run folder; the training loop saves the resolved config there once its
    own resume checks have passed (``TrainTask.checkpoint_meta["config"]``). ``inputs``: the
    identities of the checkpoints the run starts from (:func:`load_input`).

    Without ``--resume`` a folder that already holds checkpoints is refused: the new run's
    checkpoints would be rotated out by the older, higher-numbered ones.
    """
    run_dir = make_run_dir(cfg.runtime, stage, rt)
    if not cfg.runtime.resume and step_checkpoints(run_dir / CHECKPOINT_DIR):
        raise ConfigError(f"--run-dir {run_dir} already holds checkpoints of an earlier run; pass --resume true "
                          "to continue it, or choose another --run-dir")
    claim_run_folder(run_dir, stage, cfg, inputs or {}, rt.is_main, trains=True)
    return run_dir


# ----------------------------------------------------------------------------- settings
#
# Every numeric option is checked here before any work starts, one line naming its flag. Each
# test states what a valid value satisfies, so that NaN, which fails every comparison, fails it;
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
    if data.num_workers is not None:
        check_range("--num-workers", data.num_workers, 0)
    check_range("--eval-batch-size", data.eval_batch_size, 1)


def validate_world(optim: OptimConfig, rt: Runtime) -> None:
    """The global batch must split evenly over the processes."""
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


def fit_batch_to_data(optim: OptimConfig, num_examples: int, rt: Runtime) -> None:
    """Shrink the batch to the data when a small labelled subset holds fewer images than one batch."""
    largest = (num_examples // rt.world_size) * rt.world_size
    if largest == 0:
        raise ConfigError(f"only {num_examples} labelled images for {rt.world_size} processes; "
                          "raise --label-fraction or --labels-per-class")
    if optim.train_batch_size > largest:
        if rt.is_main:
            print(f"note: --train-batch-size {optim.train_batch_size} exceeds the {num_examples} training images; "
                  f"using {largest}")
        optim.train_batch_size = largest


def local_batch_size(optim: OptimConfig, rt: Runtime) -> int:
    return optim.train_batch_size // rt.world_size


# ----------------------------------------------------------------------------- data


def image_size_of(data: DataConfig, dataset: D.TensorImageDataset | Any) -> int:
    """Configured image size, else the dataset's native size."""
    if data.image_size is not None:
        return data.image_size
    return native_image_size(dataset)


def check_splits(data: DataConfig) -> None:
    """Refuse an ``--eval-split`` or ``--pretrain-split`` the dataset lacks, before any training."""
    valid = dataset_splits(data.dataset)
    for flag, split in (("--eval-split", data.eval_split), ("--pretrain-split", data.pretrain_split)):
        if valid and split not in valid:
            raise ConfigError(f"{flag} {split!r} is not a split of --dataset {data.dataset}; choose one of: "
                              f"{', '.join(valid)}")


def load_split(data: DataConfig, split: str, image_size: Optional[int] = None):
    check_splits(data)
    return D.build_dataset(data.dataset, data.data_dir, split, image_size=image_size,
                           skip_bad_images=data.skip_bad_images)


def take_subset(dataset, data: DataConfig, seed: int):
    """``--subset N``: N training images chosen by a seeded shuffle (for quick trials)."""
    if data.subset is None:
        return dataset
    n = min(data.subset, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return dataset.subset(order.sort().values)


def labelled_train_set(data: DataConfig, labels_cfg: LabelConfig, seed: int):
    """(training split after ``--subset``, its labelled part): the same labelled images for
    fine-tuning, linear evaluation and distillation."""
    train = take_subset(load_split(data, "train", data.image_size), data, seed)
    return train, train.subset(labelled_indices(labels_cfg, train, seed))


def labelled_indices(labels_cfg: LabelConfig, dataset, seed: int) -> torch.Tensor:
    """Indices of the labelled examples: a file of ids, a per-class count or a class-balanced fraction."""
    if dataset.labels is None:
        raise ConfigError(f"dataset {dataset.name!r} has no labels for this split; choose a labelled split")
    check_labels(labels_cfg)
    fraction = 1.0 if labels_cfg.label_fraction is None else labels_cfg.label_fraction
    try:
        if labels_cfg.label_file:
            return D.read_subset_file(labels_cfg.label_file, dataset.sample_ids)
        if labels_cfg.labels_per_class is not None:
            return D.label_subset(dataset.labels, per_class=labels_cfg.labels_per_class, seed=seed)
        if fraction == 1.0:
            return torch.arange(len(dataset))
        return D.label_subset(dataset.labels, fraction=fraction, seed=seed)
    except (ValueError, FileNotFoundError) as err:  # impossible requests, unknown ids, missing file
        raise ConfigError(f"labels: {err}") from None


def describe_labels(labels_cfg: LabelConfig) -> str:
    if labels_cfg.label_file:
        return f"ids in {labels_cfg.label_file}"
    if labels_cfg.labels_per_class is not None:
        return f"{labels_cfg.labels_per_class} per class"
    return f"{100 * (labels_cfg.label_fraction or 1.0):g} %"


def augment_generator(seed: int, rank: int) -> torch.Generator:
    """The augmentation's random generator for this rank: on the host whatever the device, so
    the same seed gives the same parameters on CPU and GPU, they are drawn without GPU
    launches, and the batched augmentation does not wait for the GPU (``data.augment``)."""
    return torch.Generator().manual_seed(seed * 1000 + rank)


# ----------------------------------------------------------------------------- optimisation


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """LARS as the official code sets it up, or SGD-Nesterov / Adam (official ``build_optimizer``)."""
    groups = lars_param_groups(model, optim.weight_decay)
    if optim.optimizer == "lars":
        return LARS(groups, lr=0.0, momentum=optim.momentum, weight_decay=optim.weight_decay)
    # Other optimisers decay every weight except batch-norm ones (official ``add_weight_decay``).
    params = [p for p in model.parameters() if p.requires_grad]
    bn_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              for p in m.parameters(recurse=False)}
    decay = [p for p in params if id(p) not in bn_ids]
    no_decay = [p for p in params if id(p) in bn_ids]
    grouped = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optim.optimizer == "momentum":
        return torch.optim.SGD(grouped, lr=0.0, momentum=optim.momentum, nesterov=True)
    return torch.optim.Adam(grouped, lr=0.0)


def make_schedule(optim: OptimConfig, num_examples: int) -> tuple[Any, int]:
    """(step -> learning rate, total steps) for the official warm-up + cosine schedule."""
    epochs = optim.train_epochs
    total = num_train_steps(num_examples, epochs, optim.train_batch_size, optim.train_steps)

    def lr_fn(step: int) -> float:
        return warmup_cosine_lr(step, optim.learning_rate, optim.train_batch_size, num_examples, epochs,
                                optim.warmup_epochs, optim.learning_rate_scaling, total_steps=total)
    return lr_fn, total


# ----------------------------------------------------------------------------- models


def model_kwargs(model: ModelConfig, image_size: int, num_classes: Optional[int]) -> dict[str, Any]:
    """``build_simclrv2_model`` keyword arguments for a model config (CIFAR stem at <= 32 px)."""
    cifar_stem = image_size <= 32 if model.cifar_stem is None else model.cifar_stem
    return {"depth": model.resnet_depth, "width_multiplier": model.width_multiplier, "sk_ratio": model.sk_ratio,
            "cifar_stem": cifar_stem, "num_proj_layers": model.num_proj_layers, "proj_out_dim": model.proj_out_dim,
            "ft_proj_selector": model.ft_proj_selector, "num_classes": num_classes}


def checkpoint_meta(kwargs: dict[str, Any], mode: str, cfg: Any, image_size: int, classes: Optional[list]) -> dict[str, Any]:
    """What a checkpoint records to rebuild its model and know its data."""
    return {"model_config": {**kwargs, "mode": mode}, "config": asdict(cfg),
            "image_size": image_size, "classes": list(classes) if classes else None}


def load_model(path_or_run: str, num_classes: Optional[int] = None) -> tuple[SimCLRv2Model, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (safely).

    ``num_classes`` replaces the supervised head with a new one of that size (the checkpoint's own
    head is then not loaded, as the official fine-tuning excludes ``head_supervised``).
    """
    path = resolve_checkpoint(path_or_run)
    ckpt = load_checkpoint(path)
    meta = dict(ckpt.get("model_config") or {})
    if not meta:
        raise CheckpointError(f"{path} has no model_config; was it written by simclrv2?")
    mode = meta.pop("mode", "pretrain")
    meta.pop("zero_init_logits", None)
    state = ckpt["model"]
    if num_classes is not None and num_classes != meta.get("num_classes"):
        meta["num_classes"] = num_classes
        state = {k: v for k, v in state.items() if not k.startswith("supervised_head.")}
    model = build_simclrv2_model(**meta)
    model.mode = mode
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise CheckpointError(f"{path} does not fit its recorded architecture: {detail}") from None
    missing = [k for k in missing if not k.startswith("supervised_head.")]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit its recorded architecture: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return model, ckpt


def load_input(checkpoint: str, num_classes: Optional[int] = None) -> tuple[SimCLRv2Model, dict[str, Any], dict[str, Any]]:
    """:func:`load_model` of a run's input checkpoint, with the identity of the file it resolved
    to (path, step, SHA-256), which the run records and compares on resume."""
    path = resolve_checkpoint(checkpoint)
    model, ckpt = load_model(str(path), num_classes)
    return model, ckpt, checkpoint_identity(path, ckpt)


def check_classes(recorded: Optional[list], num_outputs: int, classes: Any, checkpoint: str) -> None:
    """Labels meet a model's classifier: its recorded class names must be the data's, in the same
    order (a checkpoint without names, e.g. a converted one, must at least have as many outputs)."""
    classes = list(classes)
    if recorded is None:
        if num_outputs != len(classes):
            raise ConfigError(f"--checkpoint {checkpoint} has {num_outputs} classes but the data have {len(classes)}; "
                              "pass data with the checkpoint's classes, or another checkpoint")
        return
    recorded = list(recorded)
    if recorded == classes:
        return
    only_model = [c for c in recorded if c not in classes]
    only_data = [c for c in classes if c not in recorded]
    if only_model or only_data:
        detail = (f"only in the checkpoint: {', '.join(only_model) or 'none'}; only in the data: "
                  f"{', '.join(only_data) or 'none'}")
    else:
        detail = "the same classes in another order: " + ", ".join(
            f"{i}: {a} -> {b}" for i, (a, b) in enumerate(zip(recorded, classes)) if a != b)
    raise ConfigError(f"--checkpoint {checkpoint} was trained on other classes than the data ({detail}); pass data "
                      "with the checkpoint's classes, or another checkpoint")


_ARCHITECTURE = {"resnet_depth": "depth", "width_multiplier": "width_multiplier", "sk_ratio": "sk_ratio",
                 "cifar_stem": "cifar_stem", "num_proj_layers": "num_proj_layers", "proj_out_dim": "proj_out_dim"}


def check_architecture(cfg: Any, section: str, recorded: dict[str, Any], checkpoint: str) -> None:
    """Fail if an architecture option the user set disagrees with the checkpoint's model."""
    from simclrv2.config import explicit_options

    given = explicit_options(cfg)
    for option, key in _ARCHITECTURE.items():
        if f"{section}.{option}" in given:
            wanted = getattr(getattr(cfg, section), option)
            if wanted != recorded.get(key):
                flag = option.replace("_", "-")
                raise ConfigError(f"--{flag} {wanted} differs from the checkpoint {checkpoint} "
                                  f"({flag} {recorded.get(key)}); drop the flag or pass a matching --checkpoint")


def adopt_architecture(model: ModelConfig, recorded: dict[str, Any]) -> None:
    """Set ``model``'s architecture options to a checkpoint's, so the saved config describes the
    network actually trained."""
    for option, key in _ARCHITECTURE.items():
        if key in recorded:
            setattr(model, option, recorded[key])


def frozen_copy(model: nn.Module) -> nn.Module:
    """An inference-only copy (teacher, momentum encoder start)."""
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def freeze_for_finetuning(model: SimCLRv2Model, fine_tune_after_block: int) -> None:
    """Freeze what fine-tuning does not train (official ``fine_tune_after_block`` and selector).

    -1 trains the whole network; 0 freezes the stem; k in 1..4 also freezes block groups 1..k.
    Head layers above ``ft_proj_selector`` are unused in fine-tuning and frozen too.
    """
    encoder = model.encoder
    frozen: list[nn.Module] = []
    if fine_tune_after_block >= 0:
        frozen.append(encoder.stem)
    frozen += [getattr(encoder, f"layer{i}") for i in range(1, fine_tune_after_block + 1)]
    head = model.projection_head
    selector = head.num_layers if head.ft_proj_selector == -1 else head.ft_proj_selector
    if fine_tune_after_block == 4:
        frozen += list(head.layers[:selector])
    frozen += list(head.layers[selector:])
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)


def labelled_loss_weight_decay(model: nn.Module, optim: OptimConfig) -> Any:
    """The supervised head's L2 term that the official code adds to the loss under LARS."""
    from simclrv2.optim import supervised_head_l2

    if optim.optimizer != "lars" or optim.weight_decay == 0:
        return 0.0
    return supervised_head_l2(model, optim.weight_decay)
