"""Loss functions of SimCLRv2: contrastive (NT-Xent, MoCo-style memory) and distillation."""
from simclrv2.losses.contrastive import (
    LARGE_NUM,
    contrastive_accuracy,
    l2_normalize,
    moco_contrastive_loss,
    nt_xent,
)
from simclrv2.losses.distillation import distillation_loss, soft_targets

__all__ = [
    "LARGE_NUM",
    "contrastive_accuracy",
    "distillation_loss",
    "l2_normalize",
    "moco_contrastive_loss",
    "nt_xent",
    "soft_targets",
]
