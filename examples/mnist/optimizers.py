"""Optimizers and learning-rate schedules by name.

The Adam family and its modern variants come from adam_jax; the comparison baselines (SGD,
momentum, RMSProp, Adagrad, Adadelta) from optax. Schedule-Free AdamW replaces the decay of
the learning rate by averaging: it runs with a warm-up and a constant rate whatever
``--schedule`` says (:func:`schedule_name`), and the model is evaluated at its average
(:func:`evaluation_params`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
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
    "adopt": 3e-3,
    "ademamix": 3e-3,
    "simplified_ademamix": 3e-4,
    "cautious_adamw": 3e-3,
    "stable_adamw": 3e-3,
    "adam_atan2": 3e-3,
    "schedule_free_adamw": 3e-3,
    # RAdam starts with momentum steps, then a small rectifier, and LAMB steps a fraction of
    # each layer's norm: both need more (2 epochs on 12,000 images: RAdam 96.4% at 3e-3, 98.3%
    # at 2e-2; LAMB 94.7% at 3e-3, 98.4% at 2e-2, 96.7% at 5e-2).
    "radam": 2e-2,
    "adabelief": 3e-3,
    "lamb": 2e-2,
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
    "adopt": adam_jax.adopt,
    # A run of a few thousand steps: the paper's b3 for short runs (its appendix C.1.5).
    "ademamix": lambda lr: adam_jax.ademamix(lr, b3=0.999),
    # An accumulator, not an average: b1 = 0.9 sums ~10 gradients (the lr is ~1/10 of Adam's).
    "simplified_ademamix": lambda lr: adam_jax.simplified_ademamix(lr, b1=0.9),
    "cautious_adamw": adam_jax.cautious_adamw,
    "stable_adamw": adam_jax.stable_adamw,
    "adam_atan2": adam_jax.adam_atan2,
    "schedule_free_adamw": adam_jax.schedule_free_adamw,
    "radam": adam_jax.radam,
    "adabelief": adam_jax.adabelief,
    "lamb": adam_jax.lamb,
    "sgd": optax.sgd,
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
    "adadelta": optax.adadelta,
}
NAMES = tuple(_FACTORIES)
# The modern Adam family (adam_jax.variants), as --compare all_variants runs it.
VARIANTS = NAMES[NAMES.index("adopt") : NAMES.index("lamb") + 1]
SCHEDULE_FREE = frozenset({"schedule_free_adamw"})
SCHEDULES = ("warmup_cosine", "warmup_stable_decay", "warmup_constant", "constant")


def schedule_name(optimizer: str, name: str) -> str:
    """The schedule an optimizer runs: ``name``, except for the schedule-free ones, which
    replace the decay by averaging (``warmup_constant``, or ``constant``)."""
    if optimizer in SCHEDULE_FREE:
        return "constant" if name == "constant" else "warmup_constant"
    return name


def evaluation_params(optimizer: str, opt_state: Any, params: Any) -> Any:
    """The params to evaluate: the schedule-free average :math:`x` for the schedule-free
    optimizers (``params`` hold :math:`y` during training), else ``params``."""
    if optimizer in SCHEDULE_FREE:
        return adam_jax.schedule_free_eval_params(opt_state, params)
    return params


def schedule(name: str, peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """The learning rate as a function of the step.

    ``warmup_cosine`` rises linearly from 0 to ``peak`` over ``warmup_steps``, then follows a
    cosine down to 0 at ``total_steps``; ``warmup_stable_decay`` holds ``peak`` after the
    warmup until 80% of training, then decays linearly to 0; ``warmup_constant`` holds it to
    the end; ``constant`` is ``peak``.
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
    if name == "warmup_constant":
        return adam_jax.warmup_stable_decay_schedule(peak, warmup_steps, total_steps, 1)
    if name == "constant":
        return optax.constant_schedule(peak)
    raise ValueError(f"unknown schedule {name!r}, expected one of {SCHEDULES}")


def with_low_precision(
    tx: optax.GradientTransformation, low_precision: str, seed: int
) -> optax.GradientTransformation:
    """``tx`` as it updates low-precision params: ``"kahan"`` (a compensation buffer per param),
    ``"stochastic"`` (rounding at random, keyed by ``seed``) or ``"none"`` (as it is)."""
    if low_precision == "kahan":
        return adam_jax.kahan_summation(tx)
    if low_precision == "stochastic":
        return adam_jax.stochastic_rounding(tx, key=jax.random.fold_in(jax.random.key(seed), 1))
    if low_precision == "none":
        return tx
    raise ValueError(f"low_precision must be one of none, kahan, stochastic; got {low_precision!r}")


def create(name: str, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """The optimizer ``name`` (one of :data:`NAMES`) with the given rate or schedule."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown optimizer {name!r}, expected one of {NAMES}")
    return _FACTORIES[name](learning_rate)
