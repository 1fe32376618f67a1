"""Bias correction of exponential moving averages that start at zero."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adam_jax import _validation
from adam_jax._numerics import compute_dtype, scalar_dtype, transformation
from adam_jax._validation import static_float


def moving_average_terms(
    decay: Any, count: jax.Array, dtype: Any = jnp.float32
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
    """
    steps = jnp.asarray(count).astype(dtype)
    number = static_float(decay)
    if number == 1.0:
        return 1.0 / steps, jnp.ones((), dtype)
    if number is not None:
        weight = float(np.asarray(1.0 - number, dtype=dtype))
        if weight == 1.0:
            return weight, jnp.ones((), dtype)
        return weight, -jnp.expm1(steps * jnp.asarray(math.log1p(-weight), dtype))
    decay = jnp.asarray(decay).astype(dtype)
    saturated = decay == 1
    weight = jnp.where(saturated, 1.0 / steps, 1 - decay)
    correction = -jnp.expm1(steps * jnp.log1p(-jnp.where(saturated, 0.0, weight)))
    return weight, jnp.where(saturated, jnp.ones((), dtype), correction)


class ScaleByBiasCorrectionState(NamedTuple):
    """State of :func:`scale_by_bias_correction`: the number of updates so far (int32)."""

    count: jax.Array


def _bias_correction_update(
    updates: Any, state: ScaleByBiasCorrectionState, params: Any, *, b1: Any, b2: Any
) -> tuple[Any, ScaleByBiasCorrectionState]:
    del params
    count = optax.safe_increment(state.count)
    dtype = scalar_dtype(updates)
    correction1 = moving_average_terms(b1, count, dtype)[1]
    correction2 = moving_average_terms(b2, count, dtype)[1]
    factor = jnp.sqrt(correction2) / correction1
    updates = jax.tree.map(
        lambda u: (u.astype(compute_dtype(u.dtype)) * factor).astype(u.dtype), updates
    )
    return updates, ScaleByBiasCorrectionState(count=count)


def scale_by_bias_correction(b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    r"""Rescales updates by the Adam bias correction of uncorrected moments.

    .. math::
        u_t \leftarrow \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\, u_t

    After ``scale_by_adam(bias_correction=False)`` this gives the Keras / TensorFlow form of Adam
    ("epsilon hat"): the step size :math:`\alpha \sqrt{1-\beta_2^t}/(1-\beta_1^t)` multiplies
    :math:`m_t / (\sqrt{v_t} + \hat\epsilon)`. It can follow any moment estimate whose first and
    second moments are zero-initialised averages with decays ``b1`` and ``b2``.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import adam_jax, optax
      >>> keras_adam = optax.chain(
      ...     adam_jax.scale_by_adam(bias_correction=False),
      ...     adam_jax.scale_by_bias_correction(),
      ...     adam_jax.scale_by_learning_rate(1e-3))
    """
    _validation.check_decay("b1", b1)
    _validation.check_decay("b2", b2)

    def init_fn(params: Any) -> ScaleByBiasCorrectionState:
        del params
        return ScaleByBiasCorrectionState(count=jnp.zeros([], jnp.int32))

    return transformation(init_fn, _bias_correction_update, b1=b1, b2=b2)
