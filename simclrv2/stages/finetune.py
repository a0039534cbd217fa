"""Stage 2: fine-tune on few labels from a middle layer of the projection head (paper section 2).

The pretrained encoder and the first ``ft_proj_selector`` head layers (1 in the paper) become
the network under a new, zero-initialised linear classifier; the whole network is trained on a
class-balanced labelled subset with crop + flip augmentation only. Without ``--checkpoint`` the
same recipe trains a randomly initialised network: the supervised-only baseline.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from simclrv2.config import (FinetuneConfig, adopt_architecture, check_range, validate_model, validate_selector,
                             validate_training, validate_world)
from simclrv2.data import batches as B
from simclrv2.data.splits import describe_labels, labelled_train_set
from simclrv2.engine.checkpoint import checkpoint_meta, write_json
from simclrv2.engine.evaluation import evaluate_model
from simclrv2.engine.report import print_summary
from simclrv2.engine.run_folder import releases_run_folders
from simclrv2.engine.runtime import describe, prepare_model, setup_runtime, to_device_images
from simclrv2.engine.trainer import GeneratorState, TrainTask, train
from simclrv2.models import SimCLRv2Model, SupervisedHead, freeze_for_finetuning
from simclrv2.optim.factory import build_optimizer, labelled_loss_weight_decay, make_schedule
from simclrv2.stages import common as C


def validate(cfg: FinetuneConfig, prefix: str = "") -> None:
    """Refuse impossible settings before any work starts (``prefix``: a pipeline's ``finetune.``)."""
    validate_training(cfg, prefix)
    validate_model(cfg.model, prefix)
    if not cfg.checkpoint:  # else the selector is checked against the checkpoint's head
        validate_selector(cfg.model.ft_proj_selector, cfg.model.num_proj_layers, f"--{prefix}ft-proj-selector")
    check_range(f"--{prefix}fine-tune-after-block", cfg.fine_tune_after_block, -1, 4)


def _build_model(cfg: FinetuneConfig, image_size: int,
                 num_classes: int) -> tuple[SimCLRv2Model, FinetuneConfig, dict[str, Any]]:
    """Pretrained network with a new classifier, or a fresh one for the supervised baseline; also
    ``cfg`` with the pretrained checkpoint's architecture and the run's inputs (that checkpoint's
    identity). The checkpoint's own classifier is never reused, so its classes need not match the data's."""
    inputs: dict[str, Any] = {}
    if cfg.checkpoint:
        model, _, inputs["checkpoint"] = C.load_input(cfg.checkpoint, num_classes=num_classes)
        cfg = adopt_architecture(cfg, model.spec, cfg.checkpoint)
        selector = cfg.model.ft_proj_selector
        validate_selector(selector, model.projection_head.num_layers)
        model.projection_head.ft_proj_selector = selector
        model.supervised_head = SupervisedHead(model.projection_head.finetune_dim, num_classes)
    else:
        model = SimCLRv2Model.from_spec(cfg.model.spec(image_size, num_classes))
    model.supervised_head.reset_parameters(zero_init=cfg.zero_init_logits_layer)
    model.mode = "finetune"
    freeze_for_finetuning(model, cfg.fine_tune_after_block)
    return model, cfg, inputs


def paper_recipe(cfg: FinetuneConfig, labelled_fraction: float) -> FinetuneConfig:
    """``cfg`` with the paper's fine-tuning rule where it keeps the paper's defaults (SimCLRv2
    section 4): lr 0.005 x sqrt(B) for standard ResNets but 0.002 x sqrt(B) for wider (width > 1)
    or SK ones, and 60 epochs with 1 % of the labels but 30 with 10 % or more. A learning rate or
    epoch count that a preset or the user changed is kept."""
    paper, changes = FinetuneConfig().optim, {}
    wide = cfg.model.width_multiplier > 1 or cfg.model.sk_ratio > 0
    if wide and cfg.optim.learning_rate == paper.learning_rate and "optim.learning_rate" not in cfg.explicit:
        changes["learning_rate"] = 0.002
    if (labelled_fraction >= 0.1 and cfg.optim.train_epochs == paper.train_epochs
            and "optim.train_epochs" not in cfg.explicit and "optim.train_steps" not in cfg.explicit):
        changes["train_epochs"] = 30.0
    return replace(cfg, optim=replace(cfg.optim, **changes)) if changes else cfg


@releases_run_folders
def run(cfg: FinetuneConfig, stage: str = "finetune") -> dict[str, Any]:
    """Fine-tune (or train the baseline), evaluate on ``--eval-split`` and return the metrics."""
    validate(cfg)
    rt = setup_runtime(cfg.runtime)
    validate_world(cfg.optim, rt)
    full, labelled = labelled_train_set(cfg.data, cfg.labels, cfg.runtime.seed)
    image_size = C.image_size_of(cfg.data, full)
    cfg = replace(cfg, optim=C.fit_batch_to_data(cfg.optim, len(labelled), rt))
    model, cfg, inputs = _build_model(cfg, image_size, len(full.classes))
    cfg = paper_recipe(cfg, len(labelled) / len(full))
    run_dir, cfg = C.start_run(cfg, stage, rt, inputs)

    net = prepare_model(model, rt, cfg.runtime.global_bn, cfg.runtime.compile)
    optimizer = build_optimizer(model, cfg.optim)
    lr_fn, total_steps = make_schedule(cfg.optim, len(labelled))
    crops, augment = labelled.crop_flip_inputs(image_size, cfg.data.crop_min_area)
    batches = B.train_batches(crops, C.local_batch_size(cfg.optim, rt), rt, seed=cfg.runtime.seed,
                              num_workers=cfg.data.num_workers)
    generator = C.augment_generator(cfg.runtime.seed, rt.rank)

    def step_fn(batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        images, labels = batch
        x = to_device_images(augment(images, generator), rt)
        _, logits = net(x)
        labels = labels.to(logits.device)
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.detach().argmax(1) == labels).float().mean()
        return loss + labelled_loss_weight_decay(model, cfg.optim), {"sup_loss": loss.detach(), "sup_acc": acc}

    task = TrainTask(
        stage=stage, model=net, optimizer=optimizer, batches=batches, step_fn=step_fn, lr_fn=lr_fn,
        total_steps=total_steps, images_per_step=cfg.optim.train_batch_size,
        checkpoint_meta=checkpoint_meta(model.spec, model.mode, cfg, image_size, full.classes),
        stateful={"augment_rng": GeneratorState(generator)})
    metrics = train(task, rt, cfg.runtime, run_dir)
    result = evaluate_model(net, cfg.data, image_size, rt)
    metrics.update(result, num_labelled=len(labelled))
    if rt.is_main:
        write_json(run_dir / "eval.json", {**result, "num_labelled": len(labelled),
                                           "labels": describe_labels(cfg.labels)})
        print_summary(stage, run_dir, metrics, describe(rt))
    return {**metrics, "run_dir": str(run_dir)}
