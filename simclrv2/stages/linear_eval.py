"""Linear evaluation: a linear classifier on frozen features (official README protocol).

The frozen network's features (encoder output, or head layer ``--ft-proj-selector``) are
computed once, without augmentation, for the labelled training images and the evaluation split;
a zero-initialised linear layer is then trained on them with SGD-Nesterov (the official
``--fine_tune_after_block=4 --optimizer=momentum`` recipe). Caching the features instead of
re-augmenting every epoch makes the protocol cheap enough to run on a CPU; it is our choice and
gives a slightly lower number than training through augmented views.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import torch
import torch.nn.functional as F

from simclrv2.config import ConfigError, LinearEvalConfig, validate_selector, validate_training, validate_world
from simclrv2.data import batches as B
from simclrv2.data.splits import labelled_train_set, load_split
from simclrv2.engine.checkpoint import checkpoint_meta, write_json
from simclrv2.engine.evaluation import evaluate_classifier, extract_features
from simclrv2.engine.report import print_summary
from simclrv2.engine.run_folder import releases_run_folders
from simclrv2.engine.runtime import Runtime, describe, setup_runtime
from simclrv2.engine.trainer import TrainTask, train
from simclrv2.models import SupervisedHead
from simclrv2.optim.factory import build_optimizer, make_schedule
from simclrv2.stages import common as C


def _features(model: torch.nn.Module, selector: int, dataset: Any, batch: int, rt: Runtime, image_size: int,
              num_workers: Optional[int]):
    head = model.projection_head
    dataset, preprocess = dataset.eval_inputs(image_size)
    return extract_features(lambda x: head.hidden_at(model.encoder(x), selector),
                            B.eval_batches(dataset, batch, rt, num_workers=num_workers), rt, preprocess)


def validate(cfg: LinearEvalConfig, prefix: str = "") -> None:
    """Refuse impossible settings before any work starts (``prefix``: a pipeline's ``linear-eval.``);
    ``--ft-proj-selector`` is checked against the checkpoint's head."""
    if cfg.checkpoint is None:
        raise ConfigError("--checkpoint is required: the pretrained model to evaluate (a .pt file or a run folder)")
    validate_training(cfg, prefix)


@releases_run_folders
def run(cfg: LinearEvalConfig) -> dict[str, Any]:
    """Train and evaluate the linear classifier; return top-1/top-5 on ``--eval-split``. The
    classifier is new, so the checkpoint's classes need not match the data's."""
    validate(cfg)
    rt = setup_runtime(cfg.runtime)
    validate_world(cfg.optim, rt)
    model, _, identity = C.load_input(cfg.checkpoint)
    validate_selector(cfg.ft_proj_selector, model.projection_head.num_layers)
    full, labelled = labelled_train_set(cfg.data, cfg.labels, cfg.runtime.seed)
    image_size = C.image_size_of(cfg.data, full)
    cfg = replace(cfg, optim=C.fit_batch_to_data(cfg.optim, len(labelled), rt))
    run_dir, cfg = C.start_run(cfg, "linear-eval", rt, {"checkpoint": identity})

    model = model.to(rt.device).eval()
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Every rank trains the classifier on all features: it is tiny, and this keeps ranks in step.
    one_rank = Runtime(rt.device, rt.dtype, rt.channels_last, 0, 1)
    train_x, train_y = _features(model, cfg.ft_proj_selector, labelled, cfg.data.eval_batch_size, one_rank, image_size,
                                 cfg.data.num_workers)
    eval_set = load_split(cfg.data, cfg.data.eval_split, image_size)
    eval_x, eval_y = _features(model, cfg.ft_proj_selector, eval_set, cfg.data.eval_batch_size, one_rank, image_size,
                               cfg.data.num_workers)

    classifier = SupervisedHead(train_x.shape[1], len(full.classes), zero_init=True).to(rt.device)
    optimizer = build_optimizer(classifier, cfg.optim)
    lr_fn, total_steps = make_schedule(cfg.optim, len(labelled))
    batches = B.TensorBatches(train_x, train_y, cfg.optim.train_batch_size, seed=cfg.runtime.seed, device=rt.device)

    def step_fn(batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch
        logits = classifier(x)
        loss = F.cross_entropy(logits.float(), y)
        return loss, {"sup_acc": (logits.detach().argmax(1) == y).float().mean()}

    task = TrainTask(
        stage="linear-eval", model=classifier, optimizer=optimizer, batches=batches, step_fn=step_fn, lr_fn=lr_fn,
        total_steps=total_steps, images_per_step=cfg.optim.train_batch_size,
        checkpoint_meta={**checkpoint_meta(model.spec, "pretrain", cfg, image_size, full.classes),
                         "feature_selector": cfg.ft_proj_selector})
    metrics = train(task, rt, cfg.runtime, run_dir)  # identical on every rank; rank 0 writes
    classifier.eval()
    result = evaluate_classifier(classifier, B.TensorBatches(eval_x, eval_y, cfg.data.eval_batch_size, shuffle=False,
                                                             device=rt.device), one_rank, lambda t: t)
    metrics.update(result, num_labelled=len(labelled))
    if rt.is_main:
        write_json(run_dir / "eval.json", {**result, "num_labelled": len(labelled)})
        print_summary("linear-eval", run_dir, metrics, describe(rt))
    return {**metrics, "run_dir": str(run_dir)}
