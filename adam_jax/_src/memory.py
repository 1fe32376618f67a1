"""Measuring memory: the bytes an optimizer state takes."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def state_bytes(state: Any) -> int:
    """Total bytes of all array leaves of an optimizer state (or any pytree).

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = jnp.zeros(2**16)
      >>> print(round(adam_jax.state_bytes(adam_jax.adam(1e-3).init(params)) / params.size, 4))
      8.0001
    """
    return int(
        sum(
            np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
            for x in jax.tree.leaves(state)
            if hasattr(x, "dtype")
        )
    )
