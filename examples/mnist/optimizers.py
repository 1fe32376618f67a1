"""Optimizers and learning-rate schedules by name.

The Adam family comes from adam_jax; the comparison baselines (SGD, momentum, RMSProp,
Adagrad, Adadelta) from optax.
"""

from __future__ import annotations

from collections.abc import Callable

import optax

import adam_jax

# Peak learning rates for the warmup + cosine schedule at batch 128. The Adam family runs at
# 3x the usual constant 1e-3, since the schedule spends most steps below its peak (measured on
# the CNN, BENCHMARKS.md); the baselines use the rates customary for MNIST convnets
# (the Flax example's SGD 0.1, PyTorch's Adadelta 1.0, ...), not the result of a sweep.
PEAK_LEARNING_RATES: dict[str, float] = {
    "adam": 3e-3,
    "adamw": 3e-3,
    "nadam": 3e-3,
    "nadamw": 3e-3,
    "amsgrad": 3e-3,
    "adamax": 6e-3,
    "adamaxw": 6e-3,
    "adam_l2": 3e-3,
    "sgd": 0.1,
    "momentum": 0.03,
    "rmsprop": 1e-3,
    "adagrad": 0.03,
    "adadelta": 1.0,
}


def peak_learning_rate(name: str, learning_rate: float | None = None) -> float:
    """``learning_rate`` if given, else the tuned peak rate of optimizer ``name``."""
    return PEAK_LEARNING_RATES[name] if learning_rate is None else learning_rate


_FACTORIES: dict[str, Callable[[optax.ScalarOrSchedule], optax.GradientTransformation]] = {
    "adam": adam_jax.adam,
    "adamw": adam_jax.adamw,
    "nadam": adam_jax.nadam,
    "nadamw": adam_jax.nadamw,
    "amsgrad": adam_jax.amsgrad,
    "adamax": adam_jax.adamax,
    "adamaxw": adam_jax.adamaxw,
    "adam_l2": adam_jax.adam_l2,
    "sgd": optax.sgd,
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
    "adadelta": optax.adadelta,
}
NAMES = tuple(_FACTORIES)
SCHEDULES = ("warmup_cosine", "warmup_stable_decay", "constant")


def schedule(name: str, peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """The learning rate as a function of the step.

    ``warmup_cosine`` rises linearly from 0 to ``peak`` over ``warmup_steps``, then follows a
    cosine down to 0 at ``total_steps``; ``warmup_stable_decay`` holds ``peak`` after the
    warmup until 80% of training, then decays linearly to 0; ``constant`` is ``peak``.
    """
    decay_steps = max(total_steps - warmup_steps, 1)
    if name == "warmup_cosine":
        return adam_jax.warmup_stable_decay_schedule(
            peak, warmup_steps, 0, decay_steps, decay_type="cosine"
        )
    if name == "warmup_stable_decay":
        stable_steps = max(round(0.8 * total_steps) - warmup_steps, 0)
        return adam_jax.warmup_stable_decay_schedule(
            peak, warmup_steps, stable_steps, max(decay_steps - stable_steps, 1)
        )
    if name == "constant":
        return optax.constant_schedule(peak)
    raise ValueError(f"unknown schedule {name!r}, expected one of {SCHEDULES}")


def create(name: str, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """The optimizer ``name`` (one of :data:`NAMES`) with the given rate or schedule."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown optimizer {name!r}, expected one of {NAMES}")
    return _FACTORIES[name](learning_rate)
