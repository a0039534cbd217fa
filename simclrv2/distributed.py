"""Thin helpers around ``torch.distributed`` that degrade to identities in a single process.

The official code runs under a TPU ``tf.distribute`` strategy and gathers contrastive keys with
``tpu_cross_replica_concat`` (tf2/objective.py). Here the same role is played by
:func:`all_gather_with_grad`; the remaining helpers cover process-group set-up from ``torchrun``
environment variables, exact evaluation counting across ranks, agreeing on rank 0's values and
choices (:func:`broadcast_object`, :func:`decided_by_main`) and global batch norm on any device
(:class:`GlobalBatchNorm`, the official ``global_bn``, for back-ends where
``torch.nn.SyncBatchNorm`` is unavailable: CPU/gloo).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


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


def launch_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the ``torchrun`` variables, ``(0, 0, 1)`` without them.

    Usable before the process group exists (e.g. to pick this rank's GPU).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise ValueError("WORLD_SIZE > 1 but RANK/LOCAL_RANK are unset; launch with torchrun")
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world


def init_distributed(device: Optional[torch.device] = None) -> tuple[int, int, int]:
    """Join the process group described by ``torchrun`` variables; return ``(rank, local_rank, world)``.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``). Without
    them (or with ``WORLD_SIZE=1``) nothing is initialised and ``(0, 0, 1)`` is returned; a second
    call returns the existing group's values. With a CUDA ``device`` (default: ``cuda:LOCAL_RANK``
    when CUDA is available) the group uses NCCL for CUDA tensors and gloo for CPU tensors, so
    small CPU-side collectives also work; otherwise gloo only.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
    global_rank, local_rank, world = launch_env()
    if world == 1:
        return 0, 0, 1
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl", init_method="env://", rank=global_rank,
                                world_size=world, device_id=device)
    else:
        dist.init_process_group(backend="gloo", init_method="env://", rank=global_rank, world_size=world)
    return global_rank, local_rank, world


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects; identity in one process).

    For values each rank would otherwise compute differently, such as a time-stamped default
    run folder.
    """
    if not is_dist():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def decided_by_main(choose: Callable[[], Any]) -> Any:
    """Rank 0's ``choose()`` on every rank; what it raised there is raised on every rank.

    For choices that ranks could make differently, such as "the newest checkpoint" on a shared
    filesystem where a new file shows up on one node before another. Every rank must call it (it
    is a collective); ``choose`` runs on rank 0 only, and its result or exception must be picklable.
    """
    if not is_dist():
        return choose()
    outcome: Any = None
    if is_main():
        try:
            outcome = (True, choose())
        except Exception as err:  # every rank stops with rank 0's error
            outcome = (False, err)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (picklable objects; ``[obj]`` in one process)."""
    if not is_dist():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_dist():
        dist.barrier()


class _GlobalBatchNormFn(torch.autograd.Function):
    """Batch norm over the union of all ranks' batches, with the matching gradient.

    Forward: every rank computes its per-channel count, mean and biased variance (in float32,
    or float64 for float64 inputs); these are all-gathered and combined exactly (parallel
    variance formula), so the statistics are those of the concatenated global batch. Backward
    (same convention as :class:`_AllGatherWithGrad` and ``torch.nn.SyncBatchNorm``): the
    incoming gradient on each rank is the gradient of the sum of all ranks' losses, so the
    global sums ``sum(dy)`` and ``sum(dy * x_hat)`` are all-reduced (SUM) to form the input
    gradient, while the weight and bias gradients stay local and DDP averages them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], eps: float,
                momentum: float, group: Any) -> torch.Tensor:  # type: ignore[override]
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, channels] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = x.numel() // channels
        if count:
            var, mean = torch.var_mean(xf, dim=dims, unbiased=False)
        else:
            var = mean = xf.new_zeros(channels)
        local = torch.cat([mean, var, mean.new_tensor([float(count)])])
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        stats = torch.stack(parts)
        counts, means, variances = stats[:, -1:], stats[:, :channels], stats[:, channels:2 * channels]
        total = counts.sum()  # a tensor, so torch.compile traces through without a graph break
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None and running_var is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = var * (total / (total - 1))
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        y = (xf - mean.view(shape)) * invstd.view(shape)
        if weight is not None:
            y = y * weight.to(y.dtype).view(shape)
        if bias is not None:
            y = y + bias.to(y.dtype).view(shape)
        ctx.save_for_backward(x, weight, mean, invstd, total)
        ctx.group, ctx.has_bias = group, bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, mean, invstd, total = ctx.saved_tensors
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, channels] + [1] * (x.dim() - 2)
        dy = grad.to(mean.dtype)
        x_hat = (x.to(mean.dtype) - mean.view(shape)) * invstd.view(shape)
        local = torch.cat([dy.sum(dims), (dy * x_hat).sum(dims)])
        grad_weight = local[channels:].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = local[:channels].to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = local.clone()
            dist.all_reduce(sums, group=ctx.group)
            mean_dy = (sums[:channels] / total).view(shape)
            mean_dy_xhat = (sums[channels:] / total).view(shape)
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            grad_x = ((dy - mean_dy - x_hat * mean_dy_xhat) * scale.view(shape)).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class GlobalBatchNorm(_BatchNorm):
    """Batch norm whose training statistics span all ranks (the paper's global BN), on any device.

    Equivalent to ``torch.nn.SyncBatchNorm``, which supports accelerators only; this one also runs
    on CPUs with gloo. In evaluation mode, or without a process group, it is plain batch norm.
    Accepts (N, C) and (N, C, ...) inputs. Create it with :func:`convert_global_batchnorm`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group: Any = None,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self.process_group
        if group is None and is_dist():
            group = dist.group.WORLD
        if not self.training or group is None or dist.get_world_size(group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        return _GlobalBatchNormFn.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                        momentum, group)


def convert_global_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every batch-norm layer of ``module`` by a :class:`GlobalBatchNorm` (in place).

    Parameters and running statistics are shared with the replaced layers, so optimisers and
    references built before the conversion stay valid. Returns the (possibly new) root module.
    """
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, process_group, bias=module.bias is not None)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_global_batchnorm(child, process_group))
    return out


def cleanup() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
