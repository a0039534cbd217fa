"""NT-Xent contrastive loss of SimCLR(v2) and its MoCo-style memory variant.

:func:`nt_xent` follows the official ``add_contrastive_loss`` (tf2/objective.py) exactly:
``tf.math.l2_normalize`` semantics, self-similarities removed by subtracting ``1e9``, per-row
logits ordered ``[ab | aa]`` (view 1) and ``[ba | bb]`` (view 2), and the loss is the *sum* of
the two directions averaged over the local batch. Under ``torch.distributed`` the keys are
gathered from all ranks with gradients (see :mod:`simclrv2.distributed`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from simclrv2 import distributed

LARGE_NUM = 1e9
"""Amount subtracted from self-similarity logits (``LARGE_NUM`` in tf2/objective.py)."""


def _loss_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 kept for float64 (gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """``x / sqrt(max(sum(x**2), eps))`` along ``dim``, as ``tf.math.l2_normalize``."""
    return x * torch.rsqrt(torch.clamp((x * x).sum(dim=dim, keepdim=True), min=eps))


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _two_view_ce(
    q1: torch.Tensor,
    q2: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    temperature: float,
    extra: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared core: local queries ``q`` (b, D) against gathered keys ``k`` (N, D).

    Rows of view 1 see ``[q1 k2^T | q1 k1^T - mask | q1 extra^T]``; view 2 the mirror image.
    The positive of local row ``i`` is column ``rank*b + i``.
    """
    b = q1.shape[0]
    labels = torch.arange(b, device=q1.device) + distributed.rank() * b
    mask = F.one_hot(labels, k1.shape[0]).to(q1.dtype) * LARGE_NUM
    logits_aa = q1 @ k1.t() / temperature - mask
    logits_bb = q2 @ k2.t() / temperature - mask
    logits_ab = q1 @ k2.t() / temperature
    logits_ba = q2 @ k1.t() / temperature
    rows_a = [logits_ab, logits_aa]
    rows_b = [logits_ba, logits_bb]
    if extra is not None:
        rows_a.append(q1 @ extra.t() / temperature)
        rows_b.append(q2 @ extra.t() / temperature)
    loss_a = F.cross_entropy(torch.cat(rows_a, dim=1), labels, reduction="none")
    loss_b = F.cross_entropy(torch.cat(rows_b, dim=1), labels, reduction="none")
    return (loss_a + loss_b).mean(), logits_ab, labels


def _split_views(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if hidden.dim() != 2 or hidden.shape[0] == 0 or hidden.shape[0] % 2:
        raise ValueError(
            f"hidden must be (2B, D) with view 1 in rows [0, B) and view 2 in [B, 2B); "
            f"got shape {tuple(hidden.shape)}")
    return hidden.chunk(2, dim=0)


def nt_xent(
    hidden: torch.Tensor, temperature: float, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NT-Xent loss of SimCLR (paper eq. 1; official ``objective.add_contrastive_loss``).

    Args:
        hidden: (2B, D) projections; rows ``[0, B)`` are view 1, ``[B, 2B)`` view 2.
        temperature: softmax temperature ``tau > 0``.
        normalize: l2-normalise ``hidden`` first (flag ``hidden_norm``).

    Returns:
        ``(loss, logits_ab, labels)``: the scalar loss ``mean_i(CE_a,i + CE_b,i)`` over the
        local batch; ``logits_ab`` (B, B*world) = view-1 queries against gathered view-2 keys;
        ``labels`` (B,) long, the positive's column in ``[ab | aa]`` (``arange(B) + rank*B``),
        so ``argmax(logits_ab) == labels`` is the official contrastive accuracy.

    The loss is computed in float32 (float64 inputs stay float64) with autocast disabled.
    With world size W > 1 every rank passes its local (2B, D) and both views are gathered with
    gradient; averaging the ranks' gradients (DDP) then reproduces the single-process gradient
    on the concatenated batch.
    """
    _check_temperature(temperature)
    h1, h2 = _split_views(hidden)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        dtype = _loss_dtype(hidden)
        h1, h2 = h1.to(dtype), h2.to(dtype)
        if normalize:
            h1, h2 = l2_normalize(h1), l2_normalize(h2)
        k1, k2 = distributed.all_gather_with_grad(h1), distributed.all_gather_with_grad(h2)
        return _two_view_ce(h1, h2, k1, k2, temperature, None)


def moco_contrastive_loss(
    q1: torch.Tensor,
    q2: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    queue: Optional[torch.Tensor],
    temperature: float,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric NT-Xent with momentum-encoder keys and a queue of buffered negatives.

    SimCLRv2 (section 2 and appendix D) adds MoCo's memory: a network whose weights are a
    moving average of the online network, whose outputs are buffered as extra negatives. The
    official TF2 code has no memory, so this is our design, chosen to reduce to :func:`nt_xent`
    when keys equal the (detached) queries and the queue is empty:

    * queries ``q1, q2`` (b, D): online projections of view 1 / view 2 (carry gradient);
    * keys ``k1, k2`` (b, D): momentum-encoder projections of the same images (detached and
      gathered from all ranks without gradient);
    * view-1 row ``i`` sees ``[q1 k2^T | q1 k1^T - 1e9*self | q1 queue^T] / tau`` with positive
      ``k2_i`` (the other view of the same image); view 2 mirrors it with positive ``k1_i``;
      ``k1_i`` is masked for ``q1_i`` because it encodes the very same view;
    * loss = ``mean_i(CE_a,i + CE_b,i)`` as in the official loss.

    ``queue`` (K, D) holds *already normalised* keys (enqueue ``l2_normalize``-d keys), is used
    without gradient and may be None or empty. Returns ``(loss, logits_ab, labels)`` like
    :func:`nt_xent`.
    """
    _check_temperature(temperature)
    for name, t in (("q2", q2), ("k1", k1), ("k2", k2)):
        if t.shape != q1.shape:
            raise ValueError(f"q1, q2, k1, k2 must share shape (b, D); {name} is "
                             f"{tuple(t.shape)} but q1 is {tuple(q1.shape)}")
    if q1.dim() != 2 or q1.shape[0] == 0:
        raise ValueError(f"queries must be (b, D) with b > 0, got {tuple(q1.shape)}")
    if queue is not None and (queue.dim() != 2 or queue.shape[1] != q1.shape[1]):
        raise ValueError(f"queue must be (K, {q1.shape[1]}), got {tuple(queue.shape)}")
    with torch.autocast(device_type=q1.device.type, enabled=False):
        dtype = _loss_dtype(q1)
        q1, q2 = q1.to(dtype), q2.to(dtype)
        k1, k2 = k1.detach().to(dtype), k2.detach().to(dtype)
        if normalize:
            q1, q2, k1, k2 = (l2_normalize(t) for t in (q1, q2, k1, k2))
        k1, k2 = distributed.all_gather_nograd(k1), distributed.all_gather_nograd(k2)
        extra = None if queue is None else queue.detach().to(dtype)
        return _two_view_ce(q1, q2, k1, k2, temperature, extra)


def contrastive_accuracy(logits_ab: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose top ``logits_ab`` column is the positive (official ``contrast_acc``)."""
    return (logits_ab.argmax(dim=1) == labels).float().mean()
