"""A branch of the step taken under ``jit`` as ``jax.lax.cond``, and outside it directly."""

from __future__ import annotations

from typing import Any

import jax


def branch(pred: jax.Array, true_fn: Any, false_fn: Any, *operands: Any) -> Any:
    """``jax.lax.cond(pred, true_fn, false_fn, *operands)``; outside ``jit`` (a concrete
    ``pred``) the taken branch alone, op by op (an eager ``lax.cond`` would compile both
    branches at every call: SOAP's eigendecompositions, SPAM's draws of entries).

    Example:
      >>> import jax.numpy as jnp
      >>> from adam_jax import rules
      >>> print(rules.branch(jnp.array(True), lambda x: x + 1, lambda x: x - 1, 1.0))
      2.0
    """
    if isinstance(pred, jax.core.Tracer):
        return jax.lax.cond(pred, true_fn, false_fn, *operands)
    return true_fn(*operands) if bool(pred) else false_fn(*operands)
