"""LARS optimizer as in the official ``LARSOptimizer`` (tf2/lars_optimizer.py), classic momentum.

Per parameter ``w`` with gradient ``g``:

* ``g <- g + wd * w`` unless the group's ``weight_decay`` is 0;
* ``trust = eta * ||w|| / ||g||`` if the group has ``lars_adaptation`` and both norms are > 0,
  else 1 (You et al. 2017, "Large Batch Training of Convolutional Networks");
* ``v <- momentum * v + lr * trust * g`` (the learning rate sits *inside* the buffer);
* ``w <- w - v``.

The official code excludes variables from decay and adaptation by regex on their TF names
(``batch_normalization``, ``bias``, ``head_supervised``; model.build_optimizer). PyTorch has no
such names, so the exclusion is expressed as parameter groups: :func:`lars_param_groups`
builds them by module type and name.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling with classic momentum (official LARSOptimizer).

    Group options: ``lr``, ``momentum``, ``weight_decay``, ``eta`` and ``lars_adaptation``
    (bool). With ``exclude`` (regular expressions, searched in parameter names as the official
    ``exclude_from_weight_decay`` does), ``params`` must be ``model.named_parameters()``: matching
    parameters get neither weight decay nor adaptation. Nesterov and "popular" momentum of the
    official class are never used by SimCLRv2 and are not implemented.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        lars_adaptation: bool = True,
        exclude: Sequence[str] = (),
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if eta <= 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        lars_adaptation=lars_adaptation)
        if exclude:
            params = _split_by_name(params, exclude)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Apply one LARS update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("LARS does not support sparse gradients")
                buckets[(p.device, p.dtype)].append(p)
            for params in buckets.values():
                self._update(params, group)
        return loss

    def _update(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        lr, momentum = group["lr"], group["momentum"]
        wd, eta = group["weight_decay"], group["eta"]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        grads = [p.grad for p in params]
        if wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if group["lars_adaptation"]:
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            trust = torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm,
                                torch.ones_like(w_norm))
            updates = torch._foreach_mul(grads, list((lr * trust).unbind()))
        else:
            updates = torch._foreach_mul(grads, lr)
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, updates)
        torch._foreach_sub_(params, bufs)


def _split_by_name(named: Iterable[Any], exclude: Sequence[str]) -> list[dict[str, Any]]:
    """Two groups from ``(name, parameter)`` pairs: kept, and excluded by regex search on the name."""
    pairs = list(named)
    if not all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in pairs):
        raise ValueError("LARS(exclude=...) needs named parameters: pass model.named_parameters()")
    patterns = [re.compile(pattern) for pattern in exclude]
    excluded = [p for name, p in pairs if any(pattern.search(name) for pattern in patterns)]
    kept = [p for name, p in pairs if not any(pattern.search(name) for pattern in patterns)]
    groups = [{"params": kept}, {"params": excluded, "weight_decay": 0.0, "lars_adaptation": False}]
    return [g for g in groups if g["params"]]


def _is_excluded_name(name: str, prefixes: Sequence[str]) -> bool:
    dotted = f".{name}."
    return any(f".{prefix}." in dotted for prefix in prefixes)


def lars_param_groups(
    model: nn.Module,
    weight_decay: float,
    exclude_bn: bool = True,
    exclude_bias: bool = True,
    exclude_prefixes: Sequence[str] = ("supervised_head",),
) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed+adapted group and an excluded group.

    Mirrors ``exclude_from_weight_decay=['batch_normalization', 'bias', 'head_supervised']``
    of model.build_optimizer: parameters of ``_BatchNorm`` modules, 1-D parameters named
    ``bias``, and everything under a module path in ``exclude_prefixes`` (matched as a dotted
    component sequence anywhere in the name) get neither weight decay nor trust-ratio
    adaptation. Empty groups are dropped; each group has a ``name`` key for logging.
    """
    bn_params = set()
    if exclude_bn:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                bn_params.update(id(p) for p in module.parameters(recurse=False))
    decay, excluded = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_bias = exclude_bias and p.ndim == 1 and name.rsplit(".", 1)[-1] == "bias"
        if id(p) in bn_params or is_bias or _is_excluded_name(name, exclude_prefixes):
            excluded.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_adaptation": True,
         "name": "decay_adapt"},
        {"params": excluded, "weight_decay": 0.0, "lars_adaptation": False,
         "name": "excluded"},
    ]
    return [g for g in groups if g["params"]]


def supervised_head_l2(
    model: nn.Module, weight_decay: float, prefix: str = "supervised_head"
) -> torch.Tensor:
    """``wd * sum(w**2) / 2`` over non-bias parameters under ``prefix`` (model.add_weight_decay).

    Under LARS the official code excludes the supervised head from the optimizer's decay and
    adds this L2 term (``weight_decay * tf.nn.l2_loss``) to the loss instead.
    """
    terms = [(p.float() ** 2).sum() / 2 for name, p in model.named_parameters()
             if p.requires_grad and _is_excluded_name(name, (prefix,))
             and name.rsplit(".", 1)[-1] != "bias"]
    if not terms:
        first = next(model.parameters(), None)
        return torch.zeros((), device=first.device if first is not None else None)
    return weight_decay * torch.stack(terms).sum()
