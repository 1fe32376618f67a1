"""Dtype rules and scalar hyperparameter handling shared by the transformations."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype the arithmetic runs in: at least float32, so float16 and bfloat16 neither
    underflow (eps = 1e-8 is zero in float16) nor lose the small (1 - b) terms."""
    return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype: Any) -> jnp.dtype:
    """The real counterpart of ``dtype`` (float32 for complex64, ...)."""
    return jnp.finfo(dtype).dtype


def abs_sq(x: jax.Array) -> jax.Array:
    """``|x|**2`` as a real array, for real and complex ``x``."""
    if jnp.iscomplexobj(x):
        return jnp.square(x.real) + jnp.square(x.imag)
    return jnp.square(x)


def scalar_dtype(tree: Any) -> jnp.dtype:
    """Dtype of per-step scalars: float64 if any leaf computes in float64, else float32."""
    dtypes = [real_dtype(compute_dtype(leaf.dtype)) for leaf in jax.tree.leaves(tree)]
    return jnp.result_type(jnp.float32, *dtypes)


def _is_static(value: Any) -> bool:
    """Python numbers, flags, storages and schedules are compile-time constants; arrays and
    tracers are arguments."""
    if isinstance(value, jax.Array | np.ndarray | jax.core.Tracer):
        return False
    try:
        hash(value)
    except TypeError:
        return False
    return True


@functools.cache
def _compiled(update_step: Callable[..., Any]) -> Callable[..., Any]:
    def run(updates: Any, state: Any, params: Any, dynamic: dict, static: tuple) -> Any:
        return update_step(updates, state, params, **dynamic, **dict(static))

    return jax.jit(run, static_argnums=4)


def transformation(
    init_fn: Callable[..., Any], update_step: Callable[..., Any], **hyperparams: Any
) -> optax.GradientTransformation:
    """A ``GradientTransformation`` whose update is ``update_step(updates, state, params,
    **hyperparams)``, always compiled.

    XLA contracts multiply-adds into fused multiply-adds when it compiles a fused program, while
    op-by-op (eager) execution rounds each product: compiling the update here makes an eager call
    give the same bits as a call under the user's ``jit``. ``update_step`` is a module-level
    function and the hyperparameters are its arguments (Python numbers as compile-time
    constants, arrays as traced arguments), so rebuilding a transformation with the same
    settings, as ``optax.inject_hyperparams`` does at every step, reuses the compiled program.
    ``init`` stays eager so that its zeros keep the params' sharding.
    """
    static = tuple(sorted((k, v) for k, v in hyperparams.items() if _is_static(v)))
    dynamic = {k: v for k, v in hyperparams.items() if not _is_static(v)}
    compiled = _compiled(update_step)

    def update_fn(updates: Any, state: Any, params: Any = None) -> Any:
        return compiled(updates, state, params, dynamic, static)

    return optax.GradientTransformation(init_fn, update_fn)
