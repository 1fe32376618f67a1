"""Branches of the step taken under ``jit`` as ``jax.lax.cond`` or ``jax.lax.switch``, and
outside it directly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax


def branch(pred: jax.Array | bool, true_fn: Any, false_fn: Any, *operands: Any) -> Any:
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


def switch(index: jax.Array, branches: Sequence[Any], *operands: Any) -> Any:
    """``jax.lax.switch(index, branches, *operands)``; outside ``jit`` (a concrete
    ``index``) the taken branch alone, as :func:`branch`.

    Example:
      >>> import jax.numpy as jnp
      >>> from adam_jax import rules
      >>> print(rules.switch(jnp.array(2), [jnp.sin, jnp.cos, jnp.negative], 1.0))
      -1.0
    """
    if isinstance(index, jax.core.Tracer):
        return jax.lax.switch(index, branches, *operands)
    return branches[int(index)](*operands)
