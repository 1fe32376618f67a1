"""Zero-started exponential moving averages: the update weight and its bias correction.

Every moment estimate of the Adam family is such an average. This module holds their numerics,
shared by the moment estimates and the Keras-style step-size correction
(:func:`adam_jax.scale_by_bias_correction`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adam_jax._src.validation import static_float


def moving_average_terms(
    decay: Any, count: jax.typing.ArrayLike, dtype: Any = jnp.float32
) -> tuple[Any, jax.Array]:
    r"""The weight of a zero-started moving average and its bias correction at step ``count``.

    The average is updated as :math:`m_t = m_{t-1} + w\,(x_t - m_{t-1})` with one weight
    :math:`w = 1 - \beta` rounded once into ``dtype``. Writing it as
    :math:`\beta m_{t-1} + (1-\beta) x_t` instead rounds :math:`\beta` and :math:`1-\beta`
    separately: in float32, 0.999 and 0.001 then sum to :math:`1 + 1.3\cdot 10^{-8}`, and the
    average of a constant drifts by 1.3e-5 over a thousand steps. The correction is taken for that
    same weight, :math:`c_t = 1 - (1-w)^t = -\mathrm{expm1}(t \log(1 - w))` with the logarithm in
    double precision when ``decay`` is concrete, so the corrected average of a constant is exact
    up to a few ulps (``1 - decay**count`` in float32 loses most of its digits for decays near 1).

    A ``decay`` equal to 1, as 0.999 becomes in bfloat16 under ``optax.inject_hyperparams``,
    gives the :math:`\beta \to 1` limit of the corrected average: the running mean
    (:math:`w = 1/t`, :math:`c_t = 1`) instead of 0 / 0.

    Args:
      decay: :math:`\beta`, in [0, 1] (a float or a scalar array).
      count: the step :math:`t \geq 1` (integer scalar).
      dtype: the real dtype of the arithmetic.

    Returns:
      ``(weight, correction)``: the weight as a Python float when ``decay`` is concrete (else a
      scalar array of ``dtype``), and the correction as a scalar array of ``dtype``.

    Example:
      >>> import adam_jax
      >>> weight, correction = adam_jax.rules.moving_average_terms(0.9, 2)
      >>> print(f"{weight:.6f} {float(correction):.6f}")
      0.100000 0.190000
    """
    steps = jnp.asarray(count).astype(dtype)
    number = static_float(decay)
    if number == 1.0:
        return 1.0 / steps, jnp.ones((), dtype)
    if number is not None:
        rounded_weight = float(np.asarray(1.0 - number, dtype=dtype))
        if rounded_weight == 1.0:
            return rounded_weight, jnp.ones((), dtype)
        log_decay = jnp.asarray(math.log1p(-rounded_weight), dtype)
        return rounded_weight, -jnp.expm1(steps * log_decay)
    traced_decay = jnp.asarray(decay).astype(dtype)
    saturated = traced_decay == 1
    weight = jnp.where(saturated, 1.0 / steps, 1 - traced_decay)
    correction = -jnp.expm1(steps * jnp.log1p(-jnp.where(saturated, 0.0, weight)))
    return weight, jnp.where(saturated, jnp.ones((), dtype), correction)


def moving_average(old: jax.Array, new: jax.Array, weight: Any) -> jax.Array:
    """``old + weight * (new - old)``: one rounded weight, so the weights of the average sum to
    exactly the bias correction (see :func:`moving_average_terms`)."""
    return old + weight * (new - old)


class StepScalars(NamedTuple):
    """Per-step scalars of Adam's two averages: the weights, the bias corrections, and the first
    moment's correction at the next step (``c1_next``, for Nesterov momentum)."""

    w1: Any
    w2: Any
    c1: jax.Array
    c2: jax.Array
    c1_next: jax.Array


def step_scalars(b1: Any, b2: Any, count: jax.Array) -> Callable[[Any], StepScalars]:
    """Returns ``dtype -> StepScalars`` at step ``count``, computed once per dtype while tracing
    (a tree of a thousand leaves still traces a handful of scalar operations)."""
    cache: dict[Any, StepScalars] = {}

    def for_dtype(dtype: Any) -> StepScalars:
        if dtype not in cache:
            w1, c1 = moving_average_terms(b1, count, dtype)
            w2, c2 = moving_average_terms(b2, count, dtype)
            c1_next = moving_average_terms(b1, optax.safe_increment(count), dtype)[1]
            cache[dtype] = StepScalars(w1=w1, w2=w2, c1=c1, c2=c2, c1_next=c1_next)
        return cache[dtype]

    return for_dtype
