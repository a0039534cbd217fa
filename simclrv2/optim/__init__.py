"""Optimisation: LARS and the warm-up + cosine learning-rate schedule of SimCLRv2."""
from simclrv2.optim.lars import LARS, lars_param_groups, supervised_head_l2
from simclrv2.optim.schedule import (
    num_train_steps,
    num_warmup_steps,
    scaled_learning_rate,
    warmup_cosine_lr,
)

__all__ = [
    "LARS",
    "lars_param_groups",
    "num_train_steps",
    "num_warmup_steps",
    "scaled_learning_rate",
    "supervised_head_l2",
    "warmup_cosine_lr",
]
