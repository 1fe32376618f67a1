"""Weight decay: the decay term added to the updates, optionally masked and scheduled."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adam_jax._src import validation
from adam_jax._src.numerics import compute_dtype

Mask = Any | Callable[[optax.Params], Any]


@functools.cache
def schedule_state_type() -> type:
    """optax's state of ``add_decayed_weights`` with a schedule: a step count. optax does not
    export its type, so it is read off optax's own transformation, once, on first use (not at
    import: that would start JAX's backend before a program can configure it)."""
    return type(optax.add_decayed_weights(lambda count: 0.0).init(None))


def add_decayed_weights(
    weight_decay: optax.ScalarOrSchedule = 0.0, mask: Mask | None = None
) -> optax.GradientTransformation:
    r"""Adds the decay term: :math:`u_t \leftarrow u_t + \lambda(t)\, \theta_{t-1}`.

    Placed after a moment estimate and before the learning rate it is decoupled weight decay
    (AdamW, Loshchilov and Hutter, 2019); placed before the moment estimate it is L2
    regularisation as in ``torch.optim.Adam(weight_decay=...)``.

    A drop-in for ``optax.add_decayed_weights`` with the same states (``optax.EmptyState`` for a
    constant, a step count for a schedule): the decay term is computed in at least float32 and the
    updates keep their dtype, a constant is checked at construction, and a mask that does not fit
    the params is reported at ``init``. A constant zero rate leaves the updates untouched and
    needs no params.

    Args:
      weight_decay: a finite constant >= 0, or a schedule ``step -> rate`` (the first update uses
        its value at step 0).
      mask: a pytree of bools with the params' structure (or a prefix of it), or a callable
        returning one from the params; leaves marked ``False`` are not decayed.

    Returns:
      An ``optax.GradientTransformation``; its ``update`` requires ``params`` unless the rate is
      a constant zero.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.add_decayed_weights(0.1)
      >>> params = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])}
      >>> grads = {"w": jnp.zeros(2), "b": jnp.zeros(1)}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["w"], updates["b"])
      [0.1 0.2] [0.3]
    """
    return decayed_weights(
        "add_decayed_weights", weight_decay, mask, lambda u, p, rate: u + rate * p
    )


def decayed_weights(
    name: str,
    weight_decay: optax.ScalarOrSchedule,
    mask: Mask | None,
    decay: Callable[[jax.Array, jax.Array, Any], jax.Array],
) -> optax.GradientTransformation:
    """The transformation that replaces each update ``u`` by ``decay(u, p, rate)``, computed
    in at least float32 (``u`` and the param ``p`` in that dtype) and cast back to ``u``'s;
    ``rate`` is the constant or the schedule's value at the step count. What
    :func:`add_decayed_weights` and :func:`adam_jax.cautious_weight_decay` share: checks,
    states (optax's), the mask, and nothing done at a constant zero rate. ``name`` is the
    public transformation's, for its error messages."""
    scheduled = callable(weight_decay)
    if not scheduled:
        validation.check_non_negative("weight_decay", weight_decay)
    skip = not scheduled and validation.static_float(weight_decay) == 0.0

    def init_fn(params: optax.Params) -> Any:
        del params
        if scheduled:
            return schedule_state_type()(count=jnp.zeros([], jnp.int32))
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates, state: Any, params: optax.Params | None = None
    ) -> tuple[optax.Updates, Any]:
        new_state = state._replace(count=optax.safe_increment(state.count)) if scheduled else state
        if skip:
            return updates, new_state
        if params is None:
            raise ValueError(f"{name} needs params: call update(updates, state, params)")
        rate = weight_decay(state.count) if scheduled else weight_decay

        def decay_leaf(u: jax.Array, p: jax.Array) -> jax.Array:
            dtype = compute_dtype(u.dtype)
            return decay(u.astype(dtype), jnp.asarray(p).astype(dtype), rate).astype(u.dtype)

        return jax.tree.map(decay_leaf, updates, params), new_state

    transform = optax.GradientTransformation(init_fn, update_fn)
    return transform if mask is None else masked(transform, mask)


def masked(inner: optax.GradientTransformation, mask: Mask) -> optax.GradientTransformation:
    """``optax.masked`` whose ``init`` checks that the mask fits the params, and says so clearly
    when it does not.

    Args:
      inner: the transformation to apply to the leaves marked ``True``.
      mask: a pytree of bools with the params' structure (or a prefix of it), or a callable
        returning one from the params.

    Returns:
      An ``optax.GradientTransformation`` with optax's masked state.

    Example:
      >>> import adam_jax, optax, jax.numpy as jnp
      >>> params = {"w": jnp.ones(2), "b": jnp.ones(1)}
      >>> tx = adam_jax.masked(optax.scale(0.5), {"w": True, "b": False})
      >>> updates, _ = tx.update(params, tx.init(params))
      >>> print(updates["w"], updates["b"])
      [0.5 0.5] [1.]
    """
    wrapped = optax.masked(inner, mask)

    def init_fn(params: optax.Params) -> Any:
        if not jax.tree.leaves(params):
            # Nothing to check against, e.g. the leafless placeholder that
            # optax.tree_map_params initializes with.
            return wrapped.init(params)
        mask_tree = mask(params) if callable(mask) else mask
        try:
            jax.tree.map(lambda _, __: None, mask_tree, params)
        except (ValueError, TypeError) as error:
            raise ValueError(
                "mask must have the structure of the params (or a prefix of it): got mask "
                f"{jax.tree.structure(mask_tree)} for params {jax.tree.structure(params)}"
            ) from error
        return wrapped.init(params)

    return wrapped._replace(init=init_fn)
