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


def device_state_bytes(state: Any) -> int:
    """The most bytes of an optimizer state's arrays (or any pytree's) that one device of this
    process holds: the memory a sharded state (ZeRO-1, SOAP's ``block_axis``) costs a device.
    Leaves that are not ``jax.Array`` s count whole on every device.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> state = adam_jax.adam(1e-3).init(jnp.zeros(2**16))
      >>> print(adam_jax.device_state_bytes(state) == adam_jax.state_bytes(state))  # one device
      True
    """
    held: dict[Any, int] = {}
    whole = 0
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
        elif hasattr(leaf, "dtype"):
            whole += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return max(held.values(), default=0) + whole
