"""Learning-rate and sparsity-coefficient schedules, as pure functions of the step (so resume needs no state)."""

from __future__ import annotations

import math

from saeforge.errors import SaeforgeError

LR_DECAYS = ("linear", "cosine", "none")


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay: str, decay_fraction: float) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based).

    Linear warm-up from 0 over ``warmup_steps``; constant; then over the last ``decay_fraction`` of the run a
    linear or cosine decay to 0 (the April-2024 recipe decays linearly over the last 20 %).
    """
    if decay not in LR_DECAYS:
        raise SaeforgeError(f"unknown learning-rate decay {decay!r}", f"use one of {', '.join(LR_DECAYS)}")
    factor = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        factor = (step + 1) / warmup_steps
    if decay == "none" or decay_fraction <= 0:
        return factor
    decay_start = total_steps * (1.0 - decay_fraction)
    if step >= decay_start:
        progress = min(1.0, (step - decay_start) / max(1.0, total_steps - decay_start))
        tail = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        factor = min(factor, tail)
    return factor


def sparsity_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up of the sparsity coefficient from 0 to 1 over ``warmup_steps``."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)
