"""MoCo-style memory of SimCLRv2 (paper section 2 and appendix D).

SimCLRv2 adds "a memory network (with a moving average of weights for stabilization) whose
output will be buffered as negative examples" (He et al. 2020, MoCo). This module has the two
pieces: :func:`ema_update_` for the moving-average network and :class:`FeatureQueue` for the
buffered keys. The official TF2 code has neither; the loss using them is
:func:`simclrv2.losses.moco_contrastive_loss`.
"""
from __future__ import annotations

import torch
from torch import nn

from simclrv2 import distributed


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, decay: float) -> None:
    """In place: ``target_p = decay * target_p + (1 - decay) * source_p``; buffers are copied.

    Parameters are matched by name, so both modules must have the same structure. Buffers
    (BN running statistics, counters) are copied from ``source``, as in MoCo.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    t_params = dict(target.named_parameters())
    s_params = dict(source.named_parameters())
    if t_params.keys() != s_params.keys():
        missing = sorted(set(t_params) ^ set(s_params))[:5]
        raise ValueError(f"target and source have different parameters (e.g. {missing}); "
                         "build the momentum network as a deepcopy of the online one")
    names = list(t_params)
    t_list = [t_params[n].data for n in names]
    s_list = [s_params[n].data.to(t_params[n].dtype) for n in names]
    if t_list:
        torch._foreach_mul_(t_list, decay)
        torch._foreach_add_(t_list, s_list, alpha=1.0 - decay)
    s_buffers = dict(source.named_buffers())
    for name, buf in target.named_buffers():
        if name not in s_buffers:
            raise ValueError(f"buffer {name!r} of target is missing in source")
        buf.copy_(s_buffers[name])


def _read_counters(queue: "FeatureQueue", incompatible_keys: object) -> None:
    """Host copies of the counter buffers, taken after ``load_state_dict``."""
    queue.counters = (int(queue.ptr), int(queue.num_filled))


class FeatureQueue(nn.Module):
    """FIFO of the ``size`` most recent keys, each a ``dim`` vector, kept in the state dict.

    Buffers: ``keys`` (size, dim), ``ptr`` (next slot to overwrite, i.e. the oldest entry once
    full) and ``num_filled``. Like MoCo, ``keys`` starts as random unit vectors so the full
    buffer is always usable; unlike MoCo, :meth:`filled` returns only entries written by
    :meth:`enqueue`, and that is what the loss should use, so no fake negatives enter early
    training. Enqueue l2-normalised keys: the loss treats queue entries as normalised.
    """

    keys: torch.Tensor
    ptr: torch.Tensor
    num_filled: torch.Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and dim must be > 0, got size={size}, dim={dim}")
        init = torch.randn(size, dim)
        self.register_buffer("keys", init / init.norm(dim=1, keepdim=True))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))
        # Host copies of (ptr, num_filled): reading a GPU buffer waits for the GPU's queued work.
        self.counters: tuple[int, int] = (0, 0)
        self.register_load_state_dict_post_hook(_read_counters)

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    def filled(self) -> torch.Tensor:
        """The entries written so far (all ``size`` rows once the queue has wrapped)."""
        return self.keys[: self.counters[1]]

    @torch.no_grad()
    def enqueue(self, new_keys: torch.Tensor, gather: bool = False) -> None:
        """Write ``new_keys`` (n, dim) over the oldest entries, wrapping around.

        With ``gather=True`` the keys of all ranks are gathered first (rank order), so every
        rank's queue stays identical. If more than ``size`` keys arrive, only the newest
        ``size`` survive, exactly as if they had been written one by one.
        """
        if new_keys.dim() != 2 or new_keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (n, {self.dim}), got {tuple(new_keys.shape)}")
        if gather:
            new_keys = distributed.all_gather_nograd(new_keys)
        n = new_keys.shape[0]
        if n == 0:
            return
        kept = new_keys[-self.size:].detach().to(self.keys.dtype)
        ptr, num_filled = self.counters
        start = ptr + n - kept.shape[0]
        idx = (start + torch.arange(kept.shape[0], device=self.keys.device)) % self.size
        self.keys[idx] = kept.to(self.keys.device)
        self.counters = ((ptr + n) % self.size, min(self.size, num_filled + n))
        self.ptr.fill_(self.counters[0])
        self.num_filled.fill_(self.counters[1])
