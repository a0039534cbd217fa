"""Devices, threads, precision and model wrapping (SyncBN, channels-last, DDP, compile)."""
from __future__ import annotations

import contextlib
import inspect
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from simclrv2 import distributed
from simclrv2.config import ConfigError, RuntimeConfig


@dataclass
class Runtime:
    """What a stage needs to know about where and how it runs."""

    device: torch.device
    dtype: Optional[torch.dtype]  # autocast dtype, None for float32
    channels_last: bool
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for the forward pass; losses cast to float32 themselves."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        """A gradient scaler for fp16 on CUDA; bf16 and fp32 need none."""
        if self.dtype is torch.float16:
            return torch.amp.GradScaler("cuda")
        return None


def cpu_supports_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_supports_bf16(device: torch.device) -> bool:
    """True on GPUs with native bf16 (compute capability 8.0+, Ampere on). Older GPUs emulate
    it, which ``torch.cuda.is_bf16_supported()`` also counts, several times slower than fp16."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def pick_device(name: str, local_rank: int, world: int = 1) -> torch.device:
    """The device of this process: ``auto``/``cuda`` take GPU ``LOCAL_RANK`` under torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: unsupported; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        elif world > 1:
            raise ConfigError(f"--device {name} would put all {world} processes on one GPU; use --device cuda "
                              "(each process takes GPU LOCAL_RANK) and CUDA_VISIBLE_DEVICES to choose GPUs")
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"{device} does not exist: {torch.cuda.device_count()} GPU(s) are visible; "
                              "launch at most that many processes per node (torchrun --nproc_per_node), "
                              "or use --device cpu")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: unsupported; use auto, cpu, cuda or cuda:N")
    return device


def pick_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype of ``--precision`` on ``device`` (None: float32)."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if cuda_supports_bf16(device) else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else None
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not cuda_supports_bf16(device):
            warnings.warn(f"{torch.cuda.get_device_name(device)} has no native bf16, so --precision bf16 is "
                          "emulated and slow; --precision fp16 (or auto) uses its fp16 tensor cores")
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        return torch.float16
    raise ConfigError(f"--precision {precision}: choose auto, fp32, bf16 or fp16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_threads() -> int:
    """Usable cores; one thread per core avoids the heavy slow-down of oversubscribed OpenMP."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // max(local, 1))


def join_process_group(device_name: str) -> tuple[torch.device, int, int]:
    """``(device, rank, world)`` of this process; under torchrun it joins the process group on
    that device (a second call returns the existing group's values)."""
    _, local_rank, world = distributed.launch_env()
    device = pick_device(device_name, local_rank, world)
    rank, _, world = distributed.init_distributed(device)
    return device, rank, world


def setup_runtime(cfg: RuntimeConfig) -> Runtime:
    """Join the process group (under torchrun), set threads, seeds, device and precision.

    One process per device: under ``torchrun`` process ``LOCAL_RANK`` takes GPU ``LOCAL_RANK``
    (NCCL) or, on CPUs, a share of the cores (gloo). Seeds differ per rank (``seed + rank``) so
    ranks draw different augmentations; DDP makes the initial weights identical.
    """
    device, rank, world = join_process_group(cfg.device)
    torch.set_num_threads(cfg.num_threads or default_threads())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed + rank)
    channels_last = True if cfg.channels_last is None else cfg.channels_last
    return Runtime(device, pick_dtype(cfg.precision, device), channels_last, rank, world)


def convert_global_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch norm over the global batch: ``nn.SyncBatchNorm`` on GPUs, :class:`GlobalBatchNorm` on CPUs.

    The paper's global BN (official ``--global_bn``, default on): statistics are aggregated over
    all replicas. PyTorch's SyncBatchNorm has fused CUDA kernels but refuses CPU tensors, where
    :func:`simclrv2.distributed.convert_global_batchnorm` gives the same result.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return distributed.convert_global_batchnorm(model)


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP keyword that stops re-broadcasting buffers every forward (renamed in newer PyTorch)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def prepare_model(model: nn.Module, rt: Runtime, global_bn: bool, compile_model: bool) -> nn.Module:
    """Move to the device, use global BN when distributed, wrap in DDP and optionally compile.

    The batch-norm layers of ``model`` are replaced in place, keeping its parameters, so an
    optimiser may be built on ``model`` before or after this call. DDP copies rank 0's parameters
    to every rank at wrapping and then averages gradients; buffers are not re-broadcast every
    forward (with global BN they agree anyway; without it each rank keeps its own running
    statistics and rank 0's are saved).
    """
    if global_bn and rt.world_size > 1:
        model = convert_global_bn(model, rt.device)
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if rt.world_size > 1 and any(p.requires_grad for p in model.parameters()):
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, **_no_forward_buffer_sync())
    if compile_model:
        model = torch.compile(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def to_device_images(images: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Images as the model wants them: on the device and channels-last when enabled."""
    images = images.to(rt.device, non_blocking=True)
    if rt.channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def describe(rt: Runtime) -> dict[str, Any]:
    return {"device": str(rt.device), "precision": str(rt.dtype or torch.float32).replace("torch.", ""),
            "channels_last": rt.channels_last, "world_size": rt.world_size, "threads": torch.get_num_threads()}
