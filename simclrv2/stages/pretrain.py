"""Stage 1: task-agnostic SimCLRv2 pretraining on unlabeled images (paper section 2).

Two augmented views of each image go through the encoder and the 3-layer projection head; the
NT-Xent loss pulls the views together against every other image of the global batch. With
``--use-memory`` a momentum copy of the network adds a queue of buffered negatives (paper
appendix D). A linear head on stop-gradient features is trained alongside and reported each
epoch (official ``lineareval_while_pretraining``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from simclrv2.config import (PretrainConfig, check_range, validate_model, validate_selector, validate_training,
                             validate_world)
from simclrv2.data import batches as B
from simclrv2.data.splits import load_split, take_subset
from simclrv2.distributed import all_gather_nograd
from simclrv2.engine.checkpoint import checkpoint_meta
from simclrv2.engine.evaluation import evaluate_classifier
from simclrv2.engine.report import print_summary
from simclrv2.engine.run_folder import releases_run_folders
from simclrv2.engine.runtime import describe, prepare_model, setup_runtime, to_device_images, unwrap
from simclrv2.engine.trainer import GeneratorState, TrainTask, train
from simclrv2.losses import contrastive_accuracy, l2_normalize, moco_contrastive_loss, nt_xent
from simclrv2.losses.memory import FeatureQueue, ema_update_
from simclrv2.models import SimCLRv2Model, frozen_copy
from simclrv2.optim.factory import build_optimizer, labelled_loss_weight_decay, make_schedule
from simclrv2.stages import common as C


def validate(cfg: PretrainConfig, prefix: str = "") -> None:
    """Refuse impossible settings before any work starts (``prefix``: a pipeline's ``pretrain.``)."""
    validate_training(cfg, prefix)
    validate_model(cfg.model, prefix)
    validate_selector(cfg.model.ft_proj_selector, cfg.model.num_proj_layers, f"--{prefix}ft-proj-selector")
    check_range(f"--{prefix}temperature", cfg.temperature, 0, low_open=True)
    check_range(f"--{prefix}memory-size", cfg.memory_size, 1)
    check_range(f"--{prefix}memory-momentum", cfg.memory_momentum, 0, 1, high_open=True)


@releases_run_folders
def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain and return the final metrics; checkpoints land in ``RUN_DIR/checkpoints``."""
    validate(cfg)
    rt = setup_runtime(cfg.runtime)
    validate_world(cfg.optim, rt)
    train_set = take_subset(load_split(cfg.data, cfg.data.pretrain_split, cfg.data.image_size), cfg.data, cfg.runtime.seed)
    image_size = C.image_size_of(cfg.data, train_set)
    has_labels = train_set.labels is not None and cfg.lineareval_while_pretraining
    num_classes = len(train_set.classes) if has_labels else None
    run_dir, cfg = C.start_run(cfg, "pretrain", rt)

    model = SimCLRv2Model.from_spec(cfg.model.spec(image_size, num_classes))
    net = prepare_model(model, rt, cfg.runtime.global_bn, cfg.runtime.compile)
    optimizer = build_optimizer(model, cfg.optim)
    lr_fn, total_steps = make_schedule(cfg.optim, len(train_set))

    use_blur = image_size > 32 if cfg.data.use_blur is None else cfg.data.use_blur
    batches, make_views = B.pretrain_views(
        train_set, rt, augmentation=cfg.data.augmentation, batch_size=C.local_batch_size(cfg.optim, rt),
        seed=cfg.runtime.seed, image_size=image_size, strength=cfg.data.color_jitter_strength, use_blur=use_blur,
        crop_min_area=cfg.data.crop_min_area,
        num_workers=cfg.data.num_workers)
    generator = C.augment_generator(cfg.runtime.seed, rt.rank)
    stateful: dict[str, Any] = {"augment_rng": GeneratorState(generator)}

    momentum_net = queue = None
    new_keys: list[torch.Tensor] = []  # this step's keys, enqueued once the loss has been used
    if cfg.use_memory:
        momentum_net = frozen_copy(unwrap(net)).to(rt.device)
        queue = FeatureQueue(cfg.memory_size, model.projection_head.out_dim).to(rt.device)
        stateful.update(momentum_model=momentum_net, memory_queue=queue)

    def step_fn(batch_data: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        labels = batch_data[1] if has_labels else None
        views = to_device_images(make_views(batch_data, generator), rt)
        projection, logits = net(views)
        metrics: dict[str, Any] = {}
        if momentum_net is not None:
            with torch.no_grad():
                keys = l2_normalize(momentum_net(views)[0].float())
            q1, q2 = projection.chunk(2)
            k1, k2 = keys.chunk(2)
            loss, logits_ab, labels_ab = moco_contrastive_loss(q1, q2, k1, k2, queue.filled(), cfg.temperature,
                                                               normalize=cfg.hidden_norm)
            new_keys[:] = [keys]
        else:
            loss, logits_ab, labels_ab = nt_xent(projection, cfg.temperature, normalize=cfg.hidden_norm)
        metrics["contrast_loss"] = loss.detach()
        metrics["contrast_acc"] = contrastive_accuracy(logits_ab.detach(), labels_ab)
        if logits is not None and labels is not None:
            targets = torch.cat([labels, labels]).to(logits.device)
            sup_loss = F.cross_entropy(logits.float(), targets)
            metrics["sup_loss"] = sup_loss.detach()
            metrics["sup_acc"] = (logits.detach().argmax(1) == targets).float().mean()
            loss = loss + sup_loss + labelled_loss_weight_decay(model, cfg.optim)
        return loss, metrics

    def after_step(step: int) -> None:
        k1, k2 = new_keys.pop().chunk(2)  # all ranks' view-1 keys, then view-2 keys: single-process order
        queue.enqueue(torch.cat([all_gather_nograd(k1), all_gather_nograd(k2)]))
        ema_update_(momentum_net, unwrap(net), cfg.memory_momentum)

    if has_labels:
        eval_set, preprocess = load_split(cfg.data, cfg.data.eval_split, image_size).eval_inputs(image_size)

    def linear_eval(epoch: int) -> dict[str, Any]:
        """Accuracy of the linear head trained on stop-gradient features (official monitor)."""
        net.eval()
        eval_loader = B.eval_batches(eval_set, cfg.data.eval_batch_size, rt, num_workers=cfg.data.num_workers)
        result = evaluate_classifier(lambda x: net(x)[1], eval_loader, rt, preprocess)
        return {"linear_eval_top1": result["top1"], "linear_eval_top5": result["top5"]}

    task = TrainTask(
        stage="pretrain", model=net, optimizer=optimizer, batches=batches, step_fn=step_fn, lr_fn=lr_fn,
        total_steps=total_steps, images_per_step=cfg.optim.train_batch_size,
        checkpoint_meta=checkpoint_meta(model.spec, model.mode, cfg, image_size,
                                        train_set.classes if has_labels else None),
        after_step=after_step if cfg.use_memory else None, end_of_epoch=linear_eval if has_labels else None,
        stateful=stateful)
    metrics = train(task, rt, cfg.runtime, run_dir)
    if rt.is_main:
        print_summary("pretrain", run_dir, metrics, describe(rt))
    return {**metrics, "run_dir": str(run_dir)}
