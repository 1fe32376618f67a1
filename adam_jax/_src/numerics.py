"""Dtype rules shared by the transformations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from adam_jax._src.validation import static_float


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


def cast_scalar(value: Any, dtype: Any) -> Any:
    """Casts a scalar array to ``dtype``; Python floats stay weakly typed (rounded once)."""
    return value if isinstance(value, float | int) else jnp.asarray(value).astype(dtype)


def divide(eps: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Division by a denominator that has ``eps`` added.

    A concrete ``eps > 0`` keeps the denominator positive (the arithmetic runs in at least
    float32, where 1e-8 does not underflow): plain division. Otherwise 0 / 0 is taken as 0: a zero
    denominator then only arises from an all-zero gradient history, where the numerator is 0.
    """
    number = static_float(eps)
    if number is not None and number > 0:
        return jnp.divide

    def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
        return numerator / jnp.where(denominator == 0, jnp.ones_like(denominator), denominator)

    return safe_divide
