"""Keras-style bias correction: Adam's correction applied to the step size."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from adam_jax._src import validation
from adam_jax._src.moving_average import moving_average_terms
from adam_jax._src.numerics import compute_dtype, scalar_dtype

# The state is a step count, as optax's learning-rate schedule keeps.
ScaleByBiasCorrectionState = optax.ScaleByScheduleState


def scale_by_bias_correction(
    b1: float | jax.Array = 0.9, b2: float | jax.Array = 0.999
) -> optax.GradientTransformation:
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
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_bias_correction(b1=0.9, b2=0.999)
      >>> updates, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
      >>> print(updates)  # sqrt(1 - 0.999) / (1 - 0.9) at the first step
      [0.31622776 0.31622776]
    """
    validation.check_decay("b1", b1)
    validation.check_decay("b2", b2)

    def init_fn(params: optax.Params) -> optax.OptState:
        del params
        return ScaleByBiasCorrectionState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: Any = None
    ) -> tuple[optax.Updates, optax.OptState]:
        del params
        count = optax.safe_increment(state.count)
        dtype = scalar_dtype(updates)
        correction1 = moving_average_terms(b1, count, dtype)[1]
        correction2 = moving_average_terms(b2, count, dtype)[1]
        factor = jnp.sqrt(correction2) / correction1

        def scale(u: jax.Array) -> jax.Array:
            return (u.astype(compute_dtype(u.dtype)) * factor).astype(u.dtype)

        return jax.tree.map(scale, updates), ScaleByBiasCorrectionState(count=count)

    return optax.GradientTransformation(init_fn, update_fn)
