"""The learning-rate step: the last piece of every optimizer chain."""

from __future__ import annotations

import optax

from adam_jax._src import validation


def scale_by_learning_rate(
    learning_rate: optax.ScalarOrSchedule, *, flip_sign: bool = True
) -> optax.GradientTransformation:
    r"""Scales updates by the learning rate: :math:`u_t \leftarrow -\alpha(t)\, u_t`.

    ``learning_rate`` is a constant or any schedule of the step count (optax's or adam_jax's);
    the first update uses the schedule's value at step 0, as optax and PyTorch's ``LambdaLR`` do.
    This is ``optax.scale_by_learning_rate`` with the constant checked at construction.

    Args:
      learning_rate: a finite constant >= 0, or a schedule ``step -> rate``.
      flip_sign: negate the result, so that ``optax.apply_updates`` descends.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_learning_rate(0.1)
      >>> updates, _ = tx.update(jnp.array([1.0, -2.0]), tx.init(None))
      >>> print(updates)
      [-0.1  0.2]
    """
    if not callable(learning_rate):
        validation.check_non_negative("learning_rate", learning_rate)
    return optax.scale_by_learning_rate(learning_rate, flip_sign=flip_sign)
