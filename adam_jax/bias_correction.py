"""Bias correction of exponential moving averages that start at zero."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adam_jax import _validation
from adam_jax._numerics import compute_dtype, scalar_dtype
from adam_jax._validation import static_float


def one_minus_power(decay: Any, count: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    r"""Computes :math:`1 - \beta^t` without cancellation.

    ``1 - decay**count`` loses most of its digits in float32 when ``decay`` is close to 1: for
    ``decay = 0.999`` the float32 value of ``decay`` alone is off by 1.3e-5 relative to
    ``1 - decay``.
    Here :math:`1 - \beta^t = -\mathrm{expm1}(t \log \beta)`, with :math:`\log\beta` taken in double
    precision when ``decay`` is concrete, so the result is accurate to a few ulps of ``dtype``.
    A traced ``decay`` equal to 1 gives ``count``, matching the moment convention of
    ``adam_jax._numerics.decay_weights``.

    Args:
      decay: the decay rate :math:`\beta`, in [0, 1] (a float or a scalar array).
      count: the step :math:`t \geq 1` (integer scalar).
      dtype: the real dtype of the result.

    Returns:
      A scalar of ``dtype``.
    """
    steps = jnp.asarray(count).astype(dtype)
    number = static_float(decay)
    if number is not None:
        if number == 0.0:
            return jnp.ones((), dtype)
        if number == 1.0:
            return steps
        return -jnp.expm1(steps * jnp.asarray(math.log(number), dtype))
    decay = jnp.asarray(decay).astype(dtype)
    return jnp.where(decay == 1, steps, -jnp.expm1(steps * jnp.log(decay)))


class ScaleByBiasCorrectionState(NamedTuple):
    """State of :func:`scale_by_bias_correction`: the number of updates so far (int32)."""

    count: jax.Array


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

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        dtype = scalar_dtype(updates)
        factor = jnp.sqrt(one_minus_power(b2, count, dtype)) / one_minus_power(b1, count, dtype)
        updates = jax.tree.map(
            lambda u: (u.astype(compute_dtype(u.dtype)) * factor).astype(u.dtype), updates
        )
        return updates, ScaleByBiasCorrectionState(count=count)

    return optax.GradientTransformation(init_fn, update_fn)
