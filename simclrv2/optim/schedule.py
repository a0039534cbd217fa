"""Learning-rate schedule of the official ``WarmUpAndCosineDecay`` (tf2/model.py).

Linear warm-up from 0 to the scaled rate, then cosine decay to 0 at the last step, with the
official integer quirks kept: ``warmup = int(round(warmup_epochs * N // batch))`` (floor
division *before* rounding) and ``total = train_steps or N * epochs // batch + 1``.
"""
from __future__ import annotations

import math


def scaled_learning_rate(base_lr: float, batch_size: int, scaling: str) -> float:
    """``base_lr * batch/256`` (``linear``) or ``base_lr * sqrt(batch)`` (``sqrt``)."""
    if scaling == "linear":
        return base_lr * batch_size / 256.0
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    raise ValueError(f"unknown learning-rate scaling {scaling!r}; use 'linear' or 'sqrt'")


def num_train_steps(num_examples: int, epochs: int, batch_size: int, train_steps: int = 0) -> int:
    """``train_steps`` if non-zero, else ``num_examples * epochs // batch_size + 1`` (get_train_steps)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if train_steps:
        return int(train_steps)
    return int(num_examples * epochs // batch_size + 1)


def num_warmup_steps(num_examples: int, warmup_epochs: float, batch_size: int) -> int:
    """``int(round(warmup_epochs * num_examples // batch_size))`` exactly as the official code."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    return int(round(warmup_epochs * num_examples // batch_size))


def warmup_cosine_lr(
    step: float,
    base_lr: float,
    batch_size: int,
    num_examples: int,
    epochs: int,
    warmup_epochs: float,
    scaling: str,
    total_steps: int | None = None,
) -> float:
    """Learning rate at ``step`` (0-based optimizer iterations), as WarmUpAndCosineDecay.

    ``total_steps`` plays the role of the ``train_steps`` flag (None or 0: derived from
    epochs). Below the warm-up: ``step / warmup * scaled``. From then on:
    ``scaled * (1 + cos(pi * min(step - warmup, T) / T)) / 2`` with ``T = total - warmup``.
    When ``T <= 0`` the official Keras ``CosineDecay`` yields 0 (or NaN for ``T == 0``);
    we return 0 after the warm-up in both cases.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    scaled = scaled_learning_rate(base_lr, batch_size, scaling)
    warmup = num_warmup_steps(num_examples, warmup_epochs, batch_size)
    total = num_train_steps(num_examples, epochs, batch_size, total_steps or 0)
    if step < warmup:
        return step / warmup * scaled
    decay_steps = total - warmup
    if decay_steps <= 0:
        return 0.0
    progress = min(step - warmup, decay_steps) / decay_steps
    return scaled * 0.5 * (1.0 + math.cos(math.pi * progress))
