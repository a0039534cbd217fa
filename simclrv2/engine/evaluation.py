"""Top-1 / top-5 accuracy and feature extraction, exact under data parallelism.

Every rank evaluates its own shard (shards partition the split without padding) and the counts
are summed over ranks, so each example is counted exactly once.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from simclrv2.data import batches as B
from simclrv2.data.errors import DataError
from simclrv2.data.splits import load_split
from simclrv2.engine.runtime import Runtime, to_device_images


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of examples whose label is among the top-k logits, for each k (k capped at C), as
    a tensor on the logits' device (reading it would wait for the GPU)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


@torch.no_grad()
def evaluate_classifier(logits_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable,
                        rt: Runtime, preprocess: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of ``logits_fn`` over labelled ``batches``."""
    counts = torch.zeros(3, dtype=torch.float64, device=rt.device)  # top-1, top-5, examples; read once at the end
    for images, labels in batches:
        x = to_device_images(preprocess(images.to(rt.device)), rt)
        with rt.autocast():
            logits = logits_fn(x)
        counts[:2] += topk_hits(logits.float(), labels.to(logits.device))
        counts[2] += labels.shape[0]
    if rt.world_size > 1:
        torch.distributed.all_reduce(counts)
    top1, top5, total = counts.tolist()
    if total == 0:
        raise DataError("the evaluation split holds no images; choose another --eval-split or --data-dir")
    return {"top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total, "num_examples": int(total)}


@torch.no_grad()
def extract_features(feature_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, rt: Runtime,
                     preprocess: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Features (float32, on the CPU) and labels of every batch, in order."""
    feats, labels = [], []
    for images, y in batches:
        x = to_device_images(preprocess(images.to(rt.device)), rt)
        with rt.autocast():
            feats.append(feature_fn(x).float().cpu())
        if y is not None:
            labels.append(y.cpu())
    return torch.cat(feats), (torch.cat(labels) if labels else None)


def evaluate_model(net: torch.nn.Module, cfg_data: Any, image_size: int, rt: Runtime,
                   dataset: Optional[Any] = None) -> dict[str, Any]:
    """Top-1 / top-5 of ``net``'s logits on ``dataset``, by default the configured evaluation split."""
    if dataset is None:
        dataset = load_split(cfg_data, cfg_data.eval_split, image_size)
    eval_set, preprocess = dataset.eval_inputs(image_size)
    net.eval()
    return evaluate_classifier(lambda x: net(x)[1], B.eval_batches(
        eval_set, cfg_data.eval_batch_size, rt, num_workers=cfg_data.num_workers), rt, preprocess)
