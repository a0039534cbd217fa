"""Knowledge distillation loss of SimCLRv2 (paper section 2.3, eqs. 3 and 4).

``P(y|x; tau) = softmax(f(x)/tau)``. The distillation term is the cross-entropy between the
teacher's and the student's tempered distributions,
``-sum_y P_T(y|x;tau) log P_S(y|x;tau)``, averaged over the batch. With ground-truth labels the
paper mixes in the ordinary supervised loss (eq. 4):
``(1 - alpha) * CE(student, labels) + alpha * distill``; the supervised term uses the student's
untempered logits.

Paper eq. 3 has no ``tau**2`` factor; the official distillation colab
(tf2/colabs/distillation_self_training.ipynb, ``add_kd_loss``) multiplies by ``tau**2`` as in
Hinton et al. Default here is the paper; ``temperature_squared=True`` gives the colab. Both
agree at ``tau = 1``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def soft_targets(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher distribution ``softmax(teacher_logits / tau)`` (detached, at least float32)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = teacher_logits.detach().to(torch.promote_types(teacher_logits.dtype, torch.float32))
    return F.softmax(logits / temperature, dim=-1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    labels: Optional[torch.Tensor] = None,
    alpha: float = 1.0,
    temperature_squared: bool = False,
) -> torch.Tensor:
    """``(1 - alpha) * CE(student, labels) + alpha * distill`` (paper eq. 4; eq. 3 when alpha=1).

    Args:
        student_logits: (B, C) student outputs (gradient flows here).
        teacher_logits: (B, C) teacher outputs; detached, so the teacher gets no gradient.
        temperature: ``tau > 0`` applied to both teacher and student in the distill term.
        labels: (B,) class indices; required unless ``alpha == 1``.
        alpha: weight of the distillation term, in [0, 1].
        temperature_squared: multiply the distill term by ``tau**2`` (official colab).

    Returns the scalar loss, computed in float32 (float64 stays float64).
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must both be (B, C); got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if labels is None and alpha != 1.0:
        raise ValueError(f"labels are required when alpha < 1 (got alpha={alpha}); "
                         "pass labels or set alpha=1.0 for pure distillation")
    targets = soft_targets(teacher_logits, temperature)
    student = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    distill = -(targets * log_p_student).sum(dim=-1).mean()
    if temperature_squared:
        distill = distill * temperature ** 2
    if alpha == 1.0:
        return distill
    supervised = F.cross_entropy(student, labels)
    return (1.0 - alpha) * supervised + alpha * distill
