"""Stage 3: distillation with unlabeled data (paper section 2, equations 2-4).

The fine-tuned teacher is frozen in eval mode; on each augmented unlabeled image it produces
``P_T(y|x; tau)``, and the student (the teacher's architecture by default: self-distillation;
or any smaller depth/width/SK) learns to match it. With ``--distill-alpha`` below 1, a batch of
labelled images adds ``(1 - alpha)`` of the usual cross-entropy (paper equation 4).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.nn.functional as F

from simclrv2.config import (ConfigError, DistillConfig, check_range, validate_architecture, validate_selector,
                             validate_training, validate_world)
from simclrv2.data import batches as B
from simclrv2.data.splits import labelled_train_set, load_split, take_subset
from simclrv2.engine.checkpoint import checkpoint_meta, write_json
from simclrv2.engine.evaluation import evaluate_model
from simclrv2.engine.report import print_summary
from simclrv2.engine.run_folder import releases_run_folders
from simclrv2.engine.runtime import describe, prepare_model, setup_runtime, to_device_images
from simclrv2.engine.trainer import GeneratorState, TrainTask, train
from simclrv2.losses import distillation_loss
from simclrv2.models import ModelSpec, SimCLRv2Model, freeze_for_finetuning, frozen_copy
from simclrv2.optim.factory import build_optimizer, labelled_loss_weight_decay, make_schedule
from simclrv2.stages import common as C


def validate(cfg: DistillConfig, prefix: str = "") -> None:
    """Refuse impossible settings before any work starts (``prefix``: a pipeline's ``distill.``)."""
    if cfg.checkpoint is None:
        raise ConfigError("--checkpoint is required: the fine-tuned teacher (a .pt file or a run folder)")
    validate_training(cfg, prefix)
    s = cfg.student
    validate_architecture(f"{prefix}student.", s.resnet_depth, s.width_multiplier, s.sk_ratio, s.num_proj_layers)
    check_range(f"--{prefix}distill-temperature", cfg.distill_temperature, 0, low_open=True)
    check_range(f"--{prefix}distill-alpha", cfg.distill_alpha, 0, 1)


def student_spec(cfg: DistillConfig, teacher: ModelSpec) -> ModelSpec:
    """The teacher's architecture with the student options that were set."""
    spec = replace(teacher, **{k: v for k, v in asdict(cfg.student).items() if v is not None})
    validate_selector(spec.ft_proj_selector, spec.num_proj_layers, "--student.ft-proj-selector")
    return spec


def _initialise_student(student: torch.nn.Module, checkpoint: str) -> dict[str, Any]:
    """Copy a checkpoint's encoder and projection head into the student (its classifier stays new);
    returns the checkpoint's identity."""
    source, _, identity = C.load_input(checkpoint)
    wanted = {k: v for k, v in source.state_dict().items() if not k.startswith("supervised_head.")}
    own = student.state_dict()
    mismatched = [k for k, v in wanted.items() if k not in own or own[k].shape != v.shape]
    if mismatched:
        raise ConfigError(f"--student-init {checkpoint} does not fit the student ({mismatched[0]}); "
                          "give a checkpoint of the student's architecture")
    student.load_state_dict(wanted, strict=False)
    return identity


@releases_run_folders
def run(cfg: DistillConfig) -> dict[str, Any]:
    """Distill the teacher into the student, evaluate the student and return the metrics."""
    validate(cfg)
    rt = setup_runtime(cfg.runtime)
    validate_world(cfg.optim, rt)
    inputs: dict[str, Any] = {}
    teacher, teacher_ckpt, inputs["checkpoint"] = C.load_input(cfg.checkpoint)
    if teacher.supervised_head is None:
        raise ConfigError(f"--checkpoint {cfg.checkpoint} has no classifier; distill from a fine-tuned checkpoint")
    if teacher.mode == "pretrain":
        warnings.warn(f"--checkpoint {cfg.checkpoint} is not fine-tuned: its classifier is a linear head on "
                      "frozen or stop-gradient features, not the fine-tuned teacher the paper distils; run "
                      "simclrv2 finetune on it first")
    teacher.mode = "finetune"
    unlabeled = take_subset(load_split(cfg.data, cfg.data.pretrain_split, cfg.data.image_size), cfg.data,
                            cfg.runtime.seed)
    image_size = C.image_size_of(cfg.data, unlabeled)
    eval_set = load_split(cfg.data, cfg.data.eval_split, image_size)  # the teacher's classes are the student's
    C.check_classes(teacher_ckpt.get("classes"), teacher.supervised_head.linear.out_features, eval_set.classes,
                    cfg.checkpoint)
    use_labels = cfg.distill_alpha < 1.0
    labelled = None
    if use_labels:
        _, labelled = labelled_train_set(cfg.data, cfg.labels, cfg.runtime.seed)
    student = SimCLRv2Model.from_spec(student_spec(cfg, teacher.spec))
    if cfg.student_init:
        inputs["student_init"] = _initialise_student(student, cfg.student_init)
    student.mode = "finetune"
    freeze_for_finetuning(student, -1)
    run_dir, cfg = C.start_run(cfg, "distill", rt, inputs)
    teacher = frozen_copy(teacher).to(rt.device).eval()
    if rt.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    net = prepare_model(student, rt, cfg.runtime.global_bn, cfg.runtime.compile)
    optimizer = build_optimizer(student, cfg.optim)
    lr_fn, total_steps = make_schedule(cfg.optim, len(unlabeled))
    local_batch = C.local_batch_size(cfg.optim, rt)
    crops, augment = unlabeled.crop_flip_inputs(image_size, cfg.data.crop_min_area)
    batches = B.train_batches(crops, local_batch, rt, seed=cfg.runtime.seed, num_workers=cfg.data.num_workers)
    labelled_batches = None
    if labelled is not None:  # the same kind of dataset as `unlabeled`, so `augment` serves both streams
        labelled_batches = B.StepBatches(labelled.crop_flip_inputs(image_size, cfg.data.crop_min_area)[0],
                                         min(local_batch, len(labelled) // rt.world_size), rt,
                                         seed=cfg.runtime.seed + 1, num_workers=cfg.data.num_workers)
    generator = C.augment_generator(cfg.runtime.seed, rt.rank)
    tau, alpha = cfg.distill_temperature, cfg.distill_alpha

    def step_fn(batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        images, _ = batch
        x = to_device_images(augment(images, generator), rt)
        with torch.no_grad():
            teacher_logits = teacher(x)[1]
        student_logits = net(x)[1]
        distill = distillation_loss(student_logits, teacher_logits, tau)
        agreement = (student_logits.detach().argmax(1) == teacher_logits.argmax(1)).float().mean()
        metrics: dict[str, Any] = {"distill_loss": distill.detach(), "teacher_agreement": agreement}
        loss = alpha * distill
        if labelled_batches is not None:
            l_images, l_labels = labelled_batches(step)
            l_logits = net(to_device_images(augment(l_images, generator), rt))[1]
            sup = F.cross_entropy(l_logits.float(), l_labels.to(l_logits.device))
            metrics["sup_loss"] = sup.detach()
            loss = loss + (1.0 - alpha) * sup
        return loss + labelled_loss_weight_decay(student, cfg.optim), metrics

    task = TrainTask(
        stage="distill", model=net, optimizer=optimizer, batches=batches, step_fn=step_fn, lr_fn=lr_fn,
        total_steps=total_steps, images_per_step=cfg.optim.train_batch_size,
        checkpoint_meta=checkpoint_meta(student.spec, student.mode, cfg, image_size, teacher_ckpt.get("classes")),
        stateful={"augment_rng": GeneratorState(generator)})
    metrics = train(task, rt, cfg.runtime, run_dir)
    result = evaluate_model(net, cfg.data, image_size, rt, eval_set)
    metrics.update(result)
    if rt.is_main:
        write_json(run_dir / "eval.json", result)
        print_summary("distill", run_dir, metrics, describe(rt))
    return {**metrics, "run_dir": str(run_dir)}
