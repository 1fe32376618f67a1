"""Float64 references of adam_jax's learning-rate schedules, from their definitions.

Functions of the 0-based step count: ``warmup_stable_decay``, ``inverse_sqrt`` and
``linear_warmup`` (the values of ``adam_jax.warmup_stable_decay_schedule``,
``inverse_sqrt_schedule`` and ``linear_warmup``).
"""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_stable_decay(
    step: int,
    peak_value: float,
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    init_value: float = 0.0,
    end_value: float = 0.0,
    decay_type: str = "linear",
) -> float:
    """Warmup-stable-decay ("WSD") learning rate at ``step``, in float64."""
    if step < warmup_steps:
        return init_value + (peak_value - init_value) * step / warmup_steps
    if step < warmup_steps + stable_steps:
        return peak_value
    frac = min(max((step - warmup_steps - stable_steps) / decay_steps, 0.0), 1.0)
    if decay_type == "linear":
        return peak_value - (peak_value - end_value) * frac
    if decay_type == "cosine":
        return end_value + (peak_value - end_value) * 0.5 * (1 + math.cos(math.pi * frac))
    if decay_type == "sqrt":
        return peak_value - (peak_value - end_value) * math.sqrt(frac)
    raise ValueError(decay_type)


def inverse_sqrt(step: int, peak_value: float, warmup_steps: int, init_value: float = 0.0) -> float:
    """Linear warmup to ``peak_value``, then ``peak_value * sqrt(warmup_steps / step)``."""
    if step < warmup_steps:
        return init_value + (peak_value - init_value) * step / warmup_steps
    return peak_value * math.sqrt(warmup_steps / step)


def linear_warmup(
    step: int, schedule: Callable[[int], float], warmup_steps: int, init_value: float = 0.0
) -> float:
    """Linear warmup from ``init_value`` to ``schedule(0)``, then ``schedule(step - warmup)``."""
    if step < warmup_steps:
        return init_value + (schedule(0) - init_value) * step / warmup_steps
    return schedule(step - warmup_steps)
