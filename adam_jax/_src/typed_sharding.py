"""Shardings that are part of an array's type: those over Explicit mesh axes.

On a mesh with Explicit axes (``jax.make_mesh``'s default) an array's sharding is part of its
type, even under ``jit``, and operations whose operands disagree on it are type errors until
the code reshards them. Auto mesh axes are not in the type; the compiler places those.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding


def spec_entries(spec: Any, ndim: int) -> tuple[Any, ...]:
    """The entries of a ``PartitionSpec``, padded with None to one per dimension of an
    ``ndim`` array."""
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(f"PartitionSpec {spec} has more entries than the {ndim} dimensions")
    return entries + (None,) * (ndim - len(entries))


def typed_sharding(x: jax.Array) -> NamedSharding | None:
    """The sharding in ``x``'s type (Explicit mesh axes), or None when it has none."""
    sharding = jax.typeof(x).sharding
    if isinstance(sharding, NamedSharding) and any(e is not None for e in sharding.spec):
        return sharding
    return None


def reshard(x: jax.Array, typed: NamedSharding | None) -> jax.Array:
    """``x`` with the typed sharding ``typed`` (no-op when None or already so)."""
    if typed is None:
        return x
    current = spec_entries(jax.typeof(x).sharding.spec, x.ndim)
    if current == spec_entries(typed.spec, x.ndim):
        return x
    return jax.sharding.reshard(x, typed)
