"""The chain every alias builds around its transformations."""

from __future__ import annotations

import optax

from adam_jax._src.learning_rate import scale_by_learning_rate


def ascent(maximize: bool) -> tuple[optax.GradientTransformation, ...]:
    """The gradient negated first (PyTorch's ``maximize``: weight decay still shrinks the
    weights), or nothing."""
    return (optax.scale(-1.0),) if maximize else ()


def descend(
    learning_rate: optax.ScalarOrSchedule,
    *transformations: optax.GradientTransformation,
    maximize: bool = False,
) -> optax.GradientTransformation:
    """An optimizer from its transformations: the gradient negated when ``maximize`` (PyTorch's
    ``maximize``), the transformations in order, then the step of ``-learning_rate``
    (:func:`adam_jax.scale_by_learning_rate`), as one ``optax.chain``.

    Args:
      learning_rate: a constant >= 0 or a schedule of the step.
      *transformations: what turns a gradient into an update direction (a moment estimate,
        weight decay, ...).
      maximize: ascend the objective instead of descending it.

    Returns:
      The ``optax.chain``; its state is a tuple with one entry per link, as optax's aliases.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> from adam_jax import rules
      >>> tx = rules.descend(0.1, adam_jax.scale_by_adam())
      >>> updates, _ = tx.update(jnp.array([2.0, -3.0]), tx.init(jnp.zeros(2)))
      >>> print(updates)
      [-0.1  0.1]
    """
    return optax.chain(*ascent(maximize), *transformations, scale_by_learning_rate(learning_rate))
