"""Weight decay: the decay term added to the updates, optionally masked and scheduled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adam_jax import _validation
from adam_jax._numerics import compute_dtype, transformation

Mask = Any | Callable[[optax.Params], Any]


class AddDecayedWeightsState(NamedTuple):
    """State of :func:`add_decayed_weights`: the step count, for a weight-decay schedule."""

    count: jax.Array


def _decay_update(
    updates: Any, state: AddDecayedWeightsState, params: Any, *, weight_decay: Any
) -> tuple[Any, AddDecayedWeightsState]:
    if params is None:
        raise ValueError("add_decayed_weights needs params: call update(updates, state, params)")
    rate = weight_decay(state.count) if callable(weight_decay) else weight_decay

    def decay(u: jax.Array, p: jax.Array) -> jax.Array:
        dtype = compute_dtype(u.dtype)
        return (u.astype(dtype) + rate * p.astype(dtype)).astype(u.dtype)

    updates = jax.tree.map(decay, updates, params)
    return updates, AddDecayedWeightsState(count=optax.safe_increment(state.count))


def add_decayed_weights(
    weight_decay: optax.ScalarOrSchedule = 0.0, mask: Mask | None = None
) -> optax.GradientTransformation:
    r"""Adds the decay term: :math:`u_t \leftarrow u_t + \lambda(t)\, \theta_{t-1}`.

    Placed after a moment estimate and before the learning rate it is decoupled weight decay
    (AdamW, Loshchilov and Hutter, 2019); placed before the moment estimate it is L2
    regularisation as in ``torch.optim.Adam(weight_decay=...)``.

    Args:
      weight_decay: a finite constant >= 0, or a schedule ``step -> rate`` (the first update uses
        its value at step 0).
      mask: a pytree of bools with the params' structure (or a prefix of it), or a callable
        returning one from the params; leaves marked ``False`` are not decayed.

    Returns:
      An ``optax.GradientTransformation``; its ``update`` requires ``params``.

    Example:
      >>> import adam_jax, jax
      >>> no_bias = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
      >>> decay = adam_jax.add_decayed_weights(1e-4, mask=no_bias)
    """
    if not callable(weight_decay):
        _validation.check_non_negative("weight_decay", weight_decay)

    def init_fn(params: Any) -> AddDecayedWeightsState:
        del params
        return AddDecayedWeightsState(count=jnp.zeros([], jnp.int32))

    transform = transformation(init_fn, _decay_update, weight_decay=weight_decay)
    return transform if mask is None else masked(transform, mask)


def masked(inner: optax.GradientTransformation, mask: Mask) -> optax.GradientTransformation:
    """``optax.masked`` whose ``init`` checks that the mask fits the params, and says so clearly
    when it does not."""
    wrapped = optax.masked(inner, mask)

    def init_fn(params: Any) -> Any:
        mask_tree = mask(params) if callable(mask) else mask
        try:
            jax.tree.map(lambda _, __: None, mask_tree, params)
        except (ValueError, TypeError) as error:
            raise ValueError(
                "mask must have the structure of the params (or a prefix of it): got mask "
                f"{jax.tree.structure(mask_tree)} for params {jax.tree.structure(params)}"
            ) from error
        return wrapped.init(params)

    return optax.GradientTransformation(init_fn, wrapped.update)
