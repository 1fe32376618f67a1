"""What the low-precision wrappers (:mod:`adam_jax.kahan`, :mod:`adam_jax.rounding`)
share: which leaves they act on, and updates that ``optax.apply_updates`` applies exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def is_low_precision(param: Any) -> bool:
    """A floating-point param narrower than float32 (bfloat16, float16): the ones whose
    updates round away. float32 and float64 params, and non-float ones, are left alone."""
    dtype = jnp.result_type(param)
    return bool(jnp.issubdtype(dtype, jnp.floating)) and jnp.finfo(dtype).bits < 32


def landing_update(
    param: jax.Array, new_param: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """The update of ``dtype`` (the one ``inner`` returned) that moves ``param`` to
    ``new_param``, and the param ``optax.apply_updates`` makes of it (computed as it does).

    With float32 updates the two agree exactly: two bfloat16 or float16 numbers and their
    difference are exact in float32. With updates in the param's dtype they agree whenever the
    step changes the param by less than a factor of two (the difference is then exact in that
    dtype, Sterbenz's lemma), which covers the small steps that round away; a larger step
    (a sign change, a param near zero) is rounded once more by ``apply_updates``, which is why
    the landing param is returned as well (Kahan summation keeps that rounding too).
    """
    update = (new_param.astype(jnp.float32) - param.astype(jnp.float32)).astype(dtype)
    return update, jnp.asarray(param + update).astype(param.dtype)


def map_low_precision(
    fn: Callable[..., tuple[jax.Array, Any]],
    updates: optax.Updates,
    params: optax.Params,
    *per_leaf: Any,
) -> tuple[optax.Updates, list[Any]]:
    """``fn(update, param, *leaf_states)`` for each low-precision param leaf, returning its new
    update and its new leaf state; other leaves keep their update and their (empty) state.
    ``per_leaf`` are lists with one entry per leaf of ``params``. Returns the updates in
    ``updates``' structure and the list of new leaf states."""
    treedef: Any = jax.tree.structure(params)  # its methods are untyped in jax's stubs
    new_updates, new_states = [], []
    for update, param, *states in zip(
        treedef.flatten_up_to(updates), treedef.flatten_up_to(params), *per_leaf, strict=True
    ):
        if is_low_precision(param):
            update, state = fn(update, param, *states)
        else:
            state = states[0] if states else None
        new_updates.append(update)
        new_states.append(state)
    return treedef.unflatten(new_updates), new_states


def require_params(name: str, params: optax.Params | None) -> optax.Params:
    if params is None:
        raise ValueError(f"{name} needs params: call update(updates, state, params)")
    return params
