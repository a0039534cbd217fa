"""Thin helpers around ``torch.distributed`` that degrade to identities in a single process.

The official code runs under a TPU ``tf.distribute`` strategy and gathers contrastive keys with
``tpu_cross_replica_concat`` (tf2/objective.py). Here the same role is played by
:func:`all_gather_with_grad`; the remaining helpers cover process-group set-up from ``torchrun``
environment variables and exact evaluation counting across ranks.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the rank that should log, evaluate and write files."""
    return rank() == 0


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate equal-sized tensors from all ranks along dim 0, differentiably.

    Gradient semantics. Rank ``r`` computes a local loss ``L_r`` from its own queries and the
    gathered keys, and DDP averages parameter gradients: ``g = (1/W) sum_r dL_r/dtheta|_local``.
    The single-process objective is ``L = (1/W) sum_r L_r`` (every ``L_r`` is a mean over ``B/W``
    examples). For ``g`` to equal ``dL/dtheta`` the gradient arriving at rank ``r``'s own slice
    ``x_r`` must be ``sum_{r'} dL_{r'}/dx_r``: the contributions of *every* rank's loss through
    the keys it borrowed from rank ``r``. So backward sums the incoming gradient over ranks
    (all_reduce SUM) and returns this rank's slice; no division by ``W`` here, because DDP
    divides once. Checked against a single process in tests/test_distributed_gather.py.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank = dist.get_rank()
        ctx.local_size = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_size
        return grad[start:start + ctx.local_size]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 with gradients flowing back to each slice's owner.

    Every rank must pass the same shape. Identity in a single process. See
    :class:`_AllGatherWithGrad` for why backward is an all-reduce SUM followed by slicing.
    """
    if not is_dist():
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """All-gather equal-shaped tensors along dim 0 without autograd (keys, queue entries)."""
    if not is_dist():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_gather_variable(x: torch.Tensor) -> torch.Tensor:
    """All-gather tensors whose dim 0 differs between ranks (e.g. the last eval batch).

    Sizes are exchanged first, every tensor is padded to the largest, and the padding is
    dropped after gathering, so the result holds exactly ``sum_r x_r.shape[0]`` rows in rank
    order. Trailing dimensions must agree.
    """
    if not is_dist():
        return x.detach()
    x = x.detach().contiguous()
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks, returned as a new tensor (``x`` itself is left untouched)."""
    if not is_dist():
        return x.detach().clone()
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def init_distributed(backend: Optional[str] = None) -> tuple[int, int, int]:
    """Join the process group described by ``torchrun`` variables; return ``(rank, local_rank, world)``.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. Without them (or with ``WORLD_SIZE=1``)
    nothing is initialised and ``(0, 0, 1)`` is returned. The backend defaults to ``nccl`` when
    CUDA is available and ``gloo`` otherwise; with CUDA the local device is selected.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise ValueError("WORLD_SIZE > 1 but RANK/LOCAL_RANK are unset; launch with torchrun")
    global_rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=global_rank,
                            world_size=world)
    return global_rank, local_rank, world


def cleanup() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
