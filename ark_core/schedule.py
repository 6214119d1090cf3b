"""Schedules: learning rate by epoch (or round), teacher momentum and consistency weight.

Pure functions, so the centralized trainer, each federated site and the server compute the
same values from the same positions.
"""

from __future__ import annotations

import math

import numpy as np


def _cosine(start: float, end: float, cos_phase: float | np.ndarray) -> float | np.ndarray:
    """Half-cosine from ``start`` (phase 0) to ``end`` (phase pi), given the phase's cosine.

    Callers take the cosine themselves (``np.cos`` on arrays, ``math.cos`` on scalars) so each
    schedule keeps its exact floating-point values.
    """
    return end + 0.5 * (start - end) * (1 + cos_phase)


def cosine_scheduler(
    base: float, final: float, steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base``, then cosine from ``base`` to ``final``.

    Args:
        base: Value after warm-up.
        final: Value the cosine approaches at the last step.
        steps: Length of the schedule.
        warmup_steps: Leading steps of linear warm-up.
        warmup_start: First value of the warm-up.

    Returns:
        An array of exactly ``steps`` values.
    """
    if steps <= 0:
        raise ValueError(f"schedule needs at least one step, got {steps}")
    warmup_steps = min(warmup_steps, steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else []
    rest = steps - warmup_steps
    i = np.arange(rest)
    cos = _cosine(base, final, np.cos(np.pi * i / max(rest, 1)))
    out = np.concatenate([np.asarray(warm, dtype=np.float64), cos])
    assert len(out) == steps
    return out


def momentum_schedule(total_ema_steps: int, m0: float) -> np.ndarray:
    """Teacher momentum per EMA step (one step per task-epoch): cosine from m0 towards 1."""
    return cosine_scheduler(m0, 1.0, total_ema_steps)


def consistency_weight(m: float, m0: float, lam_max: float) -> float:
    """lam = (m - m0) / (1 - m0) * lam_max: 0 at the start, lam_max as the teacher settles."""
    return float((m - m0) / (1.0 - m0) * lam_max)


def lr_at(epoch: int, total_epochs: int, base_lr: float, min_lr: float, warmup_epochs: int) -> float:
    """Learning rate of ``epoch`` (0-based) in a warm-up + cosine schedule over epochs or rounds.

    Warm-up ramps linearly to ``base_lr`` and reaches it at the end of the warm-up, so the first
    epoch is never trained at zero.
    """
    if not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch {epoch} outside [0, {total_epochs})")
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / (warmup_epochs + 1)
    rest = total_epochs - warmup_epochs
    t = (epoch - warmup_epochs) / max(rest, 1)
    return _cosine(base_lr, min_lr, math.cos(math.pi * t))
