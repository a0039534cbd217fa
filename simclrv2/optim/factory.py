"""The optimiser and learning-rate schedule a stage trains with, built from its ``OptimConfig``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from simclrv2.config import OptimConfig
from simclrv2.optim.lars import LARS, lars_param_groups, supervised_head_l2
from simclrv2.optim.schedule import num_train_steps, warmup_cosine_lr


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """LARS as the official code sets it up, or SGD-Nesterov / Adam (official ``build_optimizer``)."""
    groups = lars_param_groups(model, optim.weight_decay)
    if optim.optimizer == "lars":
        return LARS(groups, lr=0.0, momentum=optim.momentum, weight_decay=optim.weight_decay)
    # Other optimisers decay every weight except batch-norm ones (official ``add_weight_decay``).
    params = [p for p in model.parameters() if p.requires_grad]
    bn_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              for p in m.parameters(recurse=False)}
    decay = [p for p in params if id(p) not in bn_ids]
    no_decay = [p for p in params if id(p) in bn_ids]
    grouped = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optim.optimizer == "momentum":
        return torch.optim.SGD(grouped, lr=0.0, momentum=optim.momentum, nesterov=True)
    return torch.optim.Adam(grouped, lr=0.0)


def make_schedule(optim: OptimConfig, num_examples: int) -> tuple[Any, int]:
    """(step -> learning rate, total steps) for the official warm-up + cosine schedule."""
    epochs = optim.train_epochs
    total = num_train_steps(num_examples, epochs, optim.train_batch_size, optim.train_steps)

    def lr_fn(step: int) -> float:
        return warmup_cosine_lr(step, optim.learning_rate, optim.train_batch_size, num_examples, epochs,
                                optim.warmup_epochs, optim.learning_rate_scaling, total_steps=total)
    return lr_fn, total


def labelled_loss_weight_decay(model: nn.Module, optim: OptimConfig) -> Any:
    """The supervised head's L2 term that the official code adds to the loss under LARS."""
    if optim.optimizer != "lars" or optim.weight_decay == 0:
        return 0.0
    return supervised_head_l2(model, optim.weight_decay)
