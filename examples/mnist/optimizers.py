"""Optimizers and learning-rate schedules by name.

The Adam family and its modern variants come from adam_jax; the comparison baselines (SGD,
momentum, RMSProp, Adagrad, Adadelta) from optax. Schedule-Free AdamW replaces the decay of
the learning rate by averaging: it runs with a warm-up and a constant rate whatever
``--schedule`` says (:func:`schedule_name`), and the model is evaluated at its average
(:func:`evaluation_params`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax

import adam_jax

# Peak learning rates of the comparison baselines for the warmup + cosine schedule at batch
# 128: the rates customary for MNIST convnets (the Flax example's SGD 0.1, PyTorch's Adadelta
# 1.0, ...), not the result of a sweep. The Adam family's come from adam_jax's registry: 3x the
# usual constant 1e-3, since the schedule spends most steps below its peak (measured on the
# CNN, docs/mnist_results.md), more for RAdam and LAMB (their rows say why).
_BASELINES: dict[
    str, tuple[float, Callable[[optax.ScalarOrSchedule], optax.GradientTransformation]]
] = {
    "sgd": (0.1, optax.sgd),
    "momentum": (0.03, lambda lr: optax.sgd(lr, momentum=0.9)),
    "rmsprop": (1e-3, optax.rmsprop),
    "adagrad": (0.03, optax.adagrad),
    "adadelta": (1.0, optax.adadelta),
}
PEAK_LEARNING_RATES: dict[str, float] = {
    **{info.name: info.learning_rate for info in adam_jax.registry.OPTIMIZERS},
    **{name: rate for name, (rate, _) in _BASELINES.items()},
}
NAMES = tuple(PEAK_LEARNING_RATES)
# The modern Adam family, as --compare all_variants runs it.
VARIANTS = adam_jax.registry.names("variant")
SCHEDULE_FREE = frozenset(info.name for info in adam_jax.registry.OPTIMIZERS if info.schedule_free)
SCHEDULES = ("warmup_cosine", "warmup_stable_decay", "warmup_constant", "constant")
# Storage of the moments (--moments): the optimizer's own (adam_jax's: the params' dtype), or
# adam_jax's 8-bit or 4-bit storages; and of the second moment alone (--second-moment), which
# takes the place of the one --moments sets.
MOMENTS: dict[str, Callable[[], dict[str, Any]]] = {
    "default": dict,
    "8bit": adam_jax.eight_bit_moments,
    "4bit": adam_jax.four_bit_moments,
}
# --second-moment factored keeps row and column means of the leaves whose two largest axes both
# have at least this many entries. 32 is the fewest channels of the models' convolutions: the
# kernels with two channel axes (3x3x32x64; deep_cnn's 3x3x32x32 and 3x3x64x64) are factored
# over them, per 3x3 position, and so are the hidden dense layers, while the axes too short to
# average over (the 3x3 window, the input's single channel, the 10 classes) keep their moment
# whole. Adafactor's 128 would leave every convolution whole.
FACTOR_MIN_DIM = 32
SECOND_MOMENTS: dict[str, Callable[[], dict[str, Any]]] = {
    "default": dict,
    "factored": lambda: {"nu_dtype": adam_jax.factored_second_moment(FACTOR_MIN_DIM)},
}


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


def _storage_arguments(name: str) -> frozenset[str]:
    """The storage arguments (``mu_dtype``, ``nu_dtype``) that optimizer ``name``'s alias takes:
    none for optax's baselines and the adam_jax optimizers whose moments are fixed."""
    if name in _BASELINES:
        return frozenset()
    parameters = inspect.signature(adam_jax.registry.get(name).alias).parameters
    return frozenset({"mu_dtype", "nu_dtype"} & parameters.keys())


def moment_storages(name: str, moments: str, second_moment: str) -> dict[str, Any]:
    """The ``mu_dtype`` and ``nu_dtype`` arguments of optimizer ``name`` for the settings
    ``moments`` (a key of :data:`MOMENTS`) and ``second_moment`` (of :data:`SECOND_MOMENTS`):
    ``{}`` for the defaults. ``moments`` sets the storages that the alias takes (Adam-mini's
    first moment only: its second moment is its own); ``second_moment`` replaces ``nu_dtype``.

    Raises:
      ValueError: for a setting that would store none of ``name``'s moments.
    """
    takes = _storage_arguments(name)
    if second_moment != "default" and "nu_dtype" not in takes:
        raise ValueError(
            f"second_moment must be default with optimizer {name!r}, which takes no storage of "
            f"its second moment (second_moment {second_moment} works with "
            f"{', '.join(_taking('nu_dtype'))}); got {second_moment!r}"
        )
    second = SECOND_MOMENTS[second_moment]()
    storages = {key: value for key, value in MOMENTS[moments]().items() if key in takes}
    if moments != "default" and not storages:
        raise ValueError(
            f"moments must be default with optimizer {name!r}, which takes no storage of its "
            f"moments (moments {moments} works with {', '.join(_taking('mu_dtype', 'nu_dtype'))}"
            f"); got {moments!r}"
        )
    if moments != "default" and storages.keys() <= second.keys():
        raise ValueError(
            f"moments must be default with optimizer {name!r} and second_moment "
            f"{second_moment}: the only moment storage it takes is the second moment's, which "
            f"second_moment sets; got {moments!r}"
        )
    return storages | second


def _taking(*arguments: str) -> list[str]:
    """The optimizers whose alias takes one of the storage ``arguments``."""
    return [name for name in NAMES if _storage_arguments(name) & set(arguments)]


def peak_learning_rate(name: str, learning_rate: float | None = None) -> float:
    """``learning_rate`` if given, else the tuned peak rate of optimizer ``name``."""
    return PEAK_LEARNING_RATES[name] if learning_rate is None else learning_rate


def create(
    name: str, learning_rate: optax.ScalarOrSchedule, **storages: Any
) -> optax.GradientTransformation:
    """The optimizer ``name`` (one of :data:`NAMES`) with the given rate or schedule: adam_jax's
    from its registry (with the options its row sets for this example, and ``storages`` from
    :func:`moment_storages`), or a baseline (which takes no ``storages``)."""
    if name in _BASELINES:
        return _BASELINES[name][1](learning_rate, **storages)
    if name not in NAMES:
        raise ValueError(f"unknown optimizer {name!r}, expected one of {NAMES}")
    return adam_jax.registry.create(name, learning_rate, **storages)
