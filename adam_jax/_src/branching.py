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


def on_platform(*operands: Any, cpu: Any, default: Any) -> Any:
    """``cpu(*operands)`` on the CPU, ``default(*operands)`` on every other backend: under
    ``jit`` (any traced operand) ``jax.lax.platform_dependent``, which traces both and keeps the
    one of the platform the program is lowered for (so a program exported for CUDA from a CPU
    host takes ``default``); outside it, the default backend's alone."""
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(operands)):
        return jax.lax.platform_dependent(*operands, cpu=cpu, default=default)
    return (cpu if jax.default_backend() == "cpu" else default)(*operands)
