"""Stage 2: fine-tune on few labels from a middle layer of the projection head (paper section 2).

The pretrained encoder and the first ``ft_proj_selector`` head layers (1 in the paper) become
the network under a new, zero-initialised linear classifier; the whole network is trained on a
class-balanced labelled subset with crop + flip augmentation only. Without ``--checkpoint`` the
same recipe trains a randomly initialised network: the supervised-only baseline.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from simclrv2.data import batches as B
from simclrv2.config import FinetuneConfig
from simclrv2.engine.evaluation import evaluate_classifier
from simclrv2.engine.run_folder import releases_run_folders, write_json
from simclrv2.engine.runtime import Runtime, describe, prepare_model, setup_runtime, to_device_images
from simclrv2.engine.summary import print_summary
from simclrv2.engine.trainer import GeneratorState, TrainTask, train
from simclrv2.models import SimCLRv2Model, SupervisedHead, build_simclrv2_model
from simclrv2.stages import common as C


def validate(cfg: FinetuneConfig, prefix: str = "") -> None:
    """Refuse impossible settings before any work starts (``prefix``: a pipeline's ``finetune.``)."""
    C.validate_training(cfg, prefix)
    C.validate_model(cfg.model, prefix)
    if not cfg.checkpoint:  # else the selector is checked against the checkpoint's head
        C.validate_selector(cfg.model.ft_proj_selector, cfg.model.num_proj_layers, f"--{prefix}ft-proj-selector")
    C.check_range(f"--{prefix}fine-tune-after-block", cfg.fine_tune_after_block, -1, 4)


def _build_model(cfg: FinetuneConfig, image_size: int,
                 num_classes: int) -> tuple[SimCLRv2Model, dict[str, Any], dict[str, Any]]:
    """Pretrained network with a new classifier, or a fresh one for the supervised baseline; also
    the run's inputs (the pretrained checkpoint's identity). The checkpoint's own classifier is
    never reused, so its classes need not match the data's."""
    inputs: dict[str, Any] = {}
    if cfg.checkpoint:
        model, ckpt, inputs["checkpoint"] = C.load_input(cfg.checkpoint, num_classes=num_classes)
        C.check_architecture(cfg, "model", ckpt["model_config"], cfg.checkpoint)
        C.adopt_architecture(cfg.model, ckpt["model_config"])
        selector = cfg.model.ft_proj_selector
        C.validate_selector(selector, model.projection_head.num_layers)
        model.projection_head.ft_proj_selector = selector
        model.supervised_head = SupervisedHead(model.projection_head.finetune_dim, num_classes)
        kwargs = {k: v for k, v in ckpt["model_config"].items() if k != "mode"}
        kwargs.update(ft_proj_selector=selector, num_classes=num_classes)
    else:
        kwargs = C.model_kwargs(cfg.model, image_size, num_classes)
        model = build_simclrv2_model(**kwargs)
    model.supervised_head.reset_parameters(zero_init=cfg.zero_init_logits_layer)
    model.mode = "finetune"
    C.freeze_for_finetuning(model, cfg.fine_tune_after_block)
    return model, kwargs, inputs


def evaluate_model(net: torch.nn.Module, cfg_data: Any, image_size: int, rt: Runtime,
                   dataset: Optional[Any] = None) -> dict[str, Any]:
    """Top-1 / top-5 of ``net``'s logits on ``dataset``, by default the configured evaluation split."""
    if dataset is None:
        dataset = C.load_split(cfg_data, cfg_data.eval_split, image_size)
    eval_set, preprocess = dataset.eval_inputs(image_size)
    net.eval()
    return evaluate_classifier(lambda x: net(x)[1], B.eval_batches(
        eval_set, cfg_data.eval_batch_size, rt, num_workers=cfg_data.num_workers), rt, preprocess)


@releases_run_folders
def run(cfg: FinetuneConfig, stage: str = "finetune") -> dict[str, Any]:
    """Fine-tune (or train the baseline), evaluate on ``--eval-split`` and return the metrics."""
    validate(cfg)
    rt = setup_runtime(cfg.runtime)
    C.validate_world(cfg.optim, rt)
    full, labelled = C.labelled_train_set(cfg.data, cfg.labels, cfg.runtime.seed)
    image_size = C.image_size_of(cfg.data, full)
    C.fit_batch_to_data(cfg.optim, len(labelled), rt)
    model, kwargs, inputs = _build_model(cfg, image_size, len(full.classes))
    run_dir = C.start_run(cfg, stage, rt, inputs)

    net = prepare_model(model, rt, cfg.runtime.global_bn, cfg.runtime.compile)
    optimizer = C.build_optimizer(model, cfg.optim)
    lr_fn, total_steps = C.make_schedule(cfg.optim, len(labelled))
    crops, augment = labelled.crop_flip_inputs(image_size)
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
        return loss + C.labelled_loss_weight_decay(model, cfg.optim), {"sup_loss": loss.detach(), "sup_acc": acc}

    task = TrainTask(
        stage=stage, model=net, optimizer=optimizer, batches=batches, step_fn=step_fn, lr_fn=lr_fn,
        total_steps=total_steps, images_per_step=cfg.optim.train_batch_size,
        checkpoint_meta=C.checkpoint_meta(kwargs, "finetune", cfg, image_size, full.classes),
        stateful={"augment_rng": GeneratorState(generator)})
    metrics = train(task, rt, cfg.runtime, run_dir)
    result = evaluate_model(net, cfg.data, image_size, rt)
    metrics.update(result, num_labelled=len(labelled))
    if rt.is_main:
        write_json(run_dir / "eval.json", {**result, "num_labelled": len(labelled),
                                           "labels": C.describe_labels(cfg.labels)})
        print_summary(stage, run_dir, metrics, describe(rt))
    return {**metrics, "run_dir": str(run_dir)}
