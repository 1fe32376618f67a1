"""The order in which a backward pass computes a loss's gradients (:func:`gradient_order`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal


def gradient_order(
    loss_fn: Callable[..., Any], params: Any, *args: Any, has_aux: bool = False
) -> tuple[int, ...]:
    """The positions of ``params``' flattened leaves in the order in which
    ``jax.grad(loss_fn, has_aux=has_aux)(params, *args)`` computes their gradients.

    A backward pass computes the gradients of the last layers first: in a transformer, the
    head's and the last block's long before the first block's and the embedding's. A step that
    brings each leaf's optimizer state from host memory in turn
    (:func:`adam_jax.offload_state`'s ``leaf_order``) can then move each leaf's state while the
    gradients of the leaves after it are still being computed. The order is read from the
    jaxpr of the gradient, traced once (nothing runs): a leaf comes where the equation that
    computes its gradient's final value comes (an unused param's zeros, which jax makes after
    the backward pass, last). Where one equation computes several gradients and runs a jaxpr of
    its own (a loss under ``jax.jit``, ``jax.checkpoint``), the order inside that jaxpr decides
    between them; leaves still computed together (a ``lax.scan``'s stacked layers) keep the
    tree's order.

    Args:
      loss_fn: the loss, differentiated with respect to its first argument.
      params: its first argument: arrays, or shapes (``jax.ShapeDtypeStruct``).
      *args: its other arguments (a batch), arrays or shapes.
      has_aux: whether ``loss_fn`` returns ``(loss, auxiliary data)``, as ``jax.grad``'s.

    Returns:
      A permutation of ``range(len(jax.tree.leaves(params)))``.

    Example:
      >>> import jax.numpy as jnp, adam_jax
      >>> def loss(p, x):
      ...     return jnp.sum(jnp.tanh(jnp.tanh(x @ p["first"]) @ p["second"]))
      >>> params = {"first": jnp.ones((3, 3)), "second": jnp.ones((3, 1))}
      >>> adam_jax.gradient_order(loss, params, jnp.ones((2, 3)))
      (1, 0)
    """
    closed = jax.make_jaxpr(jax.grad(loss_fn, has_aux=has_aux))(params, *args)
    # The gradients' leaves come first among the outputs (then the auxiliary data's).
    gradients = closed.jaxpr.outvars[: len(jax.tree.leaves(params))]
    producers: dict[int, dict[Any, tuple[int, Any]]] = {}
    computed_at = [_computed_at(var, closed.jaxpr, producers) for var in gradients]
    return tuple(sorted(range(len(computed_at)), key=computed_at.__getitem__))


def _computed_at(
    var: Any, jaxpr: Jaxpr, producers: dict[int, dict[Any, tuple[int, Any]]]
) -> tuple[int, ...]:
    """Where in ``jaxpr`` the value ``var`` is computed: the index of its equation, then, where
    that equation runs a jaxpr with an output for each of its own, where in that jaxpr; ``(-1,)``
    for a value no equation computes. ``producers`` keeps each jaxpr's map of values to their
    equations, built once."""
    if isinstance(var, Literal):
        return (-1,)
    if id(jaxpr) not in producers:
        producers[id(jaxpr)] = {
            out: (index, eqn) for index, eqn in enumerate(jaxpr.eqns) for out in eqn.outvars
        }
    found = producers[id(jaxpr)].get(var)
    if found is None:
        return (-1,)
    index, eqn = found
    inner = _called_jaxpr(eqn)
    if inner is None:
        return (index,)
    return (index, *_computed_at(inner.outvars[eqn.outvars.index(var)], inner, producers))


def _called_jaxpr(eqn: Any) -> Jaxpr | None:
    """The jaxpr an equation runs whose outputs are the equation's (``jax.jit``'s, a call's,
    ``jax.checkpoint``'s), or None."""
    for value in eqn.params.values():
        inner = value.jaxpr if isinstance(value, ClosedJaxpr) else value
        if isinstance(inner, Jaxpr) and len(inner.outvars) == len(eqn.outvars):
            return inner
    return None
