"""Dtype rules shared by the transformations."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


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
