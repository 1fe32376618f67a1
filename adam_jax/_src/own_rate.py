"""The step of a rule that holds its own learning rate: the update is the whole step (negated,
with the rule's own weight decay), not a direction that a chain's last link scales."""

from __future__ import annotations

from typing import Any

import jax

from adam_jax._src import validation
from adam_jax._src.rule import Leaf


def step_with_rate(
    direction: jax.Array,
    rate: Any,
    leaf: Leaf,
    *,
    decay: Any = None,
    decay_after_step: bool = False,
    decay_times_rate: bool = False,
    param: jax.Array | None = None,
) -> jax.Array:
    r"""The additive update of a rule that holds its learning rate (a ``learning_rate`` field,
    read with :meth:`MomentRule.rate <adam_jax.rules.MomentRule.rate>`): ``-rate`` times the
    direction, with the leaf's decoupled weight decay.

    With :math:`\gamma` the ``rate``, :math:`u` the ``direction``, :math:`\lambda` the
    ``decay`` and :math:`\theta` the ``param``:

    * ``decay_after_step=False`` (AdamW's order): :math:`-\gamma (u + \lambda \theta)`, the
      params decayed before the step (MARS);
    * ``decay_after_step=True``: :math:`-\gamma u - \lambda (\theta - \gamma u)`, the stepped
      params shrink by :math:`1 - \lambda` (LaProp's authors), or with ``decay_times_rate``
      by :math:`1 - \gamma\lambda` (SPAM's authors).

    The decay applies where ``leaf.decay`` is not the constant 0 (the leaf is masked in, and
    the rule was given a decay): a rule whose decay is scaled or chosen per leaf passes that
    ``decay`` (default ``leaf.decay``) and keeps the mask in ``leaf.decay``.

    Args:
      direction: the leaf's direction (what a chain ending in the learning rate would scale).
      rate: this step's learning rate, in the direction's dtype; ``None``: the direction with
        the decay added, not negated (the rule's transformation, ``learning_rate=None``).
      leaf: the :class:`Leaf` of the update.
      decay: the decay rate :math:`\lambda` (``None``: ``leaf.decay``).
      decay_after_step: decay the stepped params, not the params before the step.
      decay_times_rate: with ``decay_after_step``, the stepped params shrink by the rate times
        the decay (before the step, the rate always scales it).
      param: the params the decay shrinks (``None``: ``leaf.param``; a rule that steps some
        entries of a leaf passes those entries).

    Returns:
      The update, to be added to the params.

    Raises:
      ValueError: where the decay applies and no params were given to ``update``.

    Example:
      >>> import jax.numpy as jnp
      >>> from adam_jax import rules
      >>> leaf = rules.Leaf(param=jnp.array([1.0, -2.0]), decay=0.5)
      >>> direction = jnp.array([1.0, 1.0])
      >>> print(rules.step_with_rate(direction, 0.1, leaf))  # -0.1 * (u + 0.5 * param)
      [-0.15  0.  ]
      >>> print(rules.step_with_rate(direction, 0.1, leaf, decay_after_step=True))
      [-0.55  0.95]
    """
    decayed = validation.static_float(leaf.decay) != 0.0
    param = leaf.param if param is None else param
    if decayed and param is None:
        raise ValueError("weight decay needs params: call update(updates, state, params)")
    decay = leaf.decay if decay is None else decay
    if rate is None or not decay_after_step:
        if decayed:
            direction = direction + decay * param
        return direction if rate is None else -rate * direction
    step = rate * direction
    if not decayed:
        return -step
    if decay_times_rate:
        return -step - rate * decay * (param - step)
    return -step - decay * (param - step)
