"""The order in which a backward pass computes a loss's gradients (:func:`gradient_order`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.extend.core import Literal


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
    the backward pass, last), and leaves whose gradients the same equation computes (a call
    that returns several: a loss under ``jax.jit``, a ``lax.scan`` over layers) in the tree's
    order.

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
    made_at: dict[Any, int] = {}
    for index, eqn in enumerate(closed.jaxpr.eqns):
        for var in eqn.outvars:
            made_at[var] = index
    # The gradients' leaves come first among the outputs (then the auxiliary data's).
    gradients = closed.jaxpr.outvars[: len(jax.tree.leaves(params))]
    computed_at = [-1 if isinstance(var, Literal) else made_at.get(var, -1) for var in gradients]
    return tuple(sorted(range(len(computed_at)), key=computed_at.__getitem__))
