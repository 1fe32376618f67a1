"""Shardings that are part of an array's type: those over Explicit mesh axes.

On a mesh with Explicit axes (``jax.make_mesh``'s default) an array's sharding is part of its
type, even under ``jit``, and operations whose operands disagree on it are type errors until
the code reshards them. Auto mesh axes are not in the type; the compiler places those.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec


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


def place_like(x: jax.Array, like: Any) -> jax.Array:
    """``x`` placed as the stored leaf ``like``: with its typed sharding on Explicit meshes and,
    outside ``jit``, with its sharding (eager ops on Auto meshes may change a layout's)."""
    typed = typed_sharding(like)
    if typed is not None:
        return reshard(x, typed)
    eager = not isinstance(x, jax.core.Tracer) and isinstance(like, jax.Array)
    if eager and not isinstance(like, jax.core.Tracer) and like.committed:
        return jax.device_put(x, like.sharding)
    return x


def placement_of(param: Any) -> Any:
    """Where state like ``param`` goes: the sharding in a traced param's type, a committed
    array's sharding, a ``ShapeDtypeStruct``'s sharding; None for the default device."""
    if isinstance(param, jax.core.Tracer):
        return typed_sharding(param)
    if isinstance(param, jax.Array):
        return param.sharding if param.committed else None
    return getattr(param, "sharding", None)


def replicated_placement(param: Any) -> Any:
    """Where state of another shape than ``param`` goes whole: :func:`placement_of` the param,
    replicated over its mesh (None for the default device)."""
    placement = placement_of(param)
    if isinstance(placement, NamedSharding):
        return NamedSharding(placement.mesh, PartitionSpec(), memory_kind=placement.memory_kind)
    return placement


def replicated(x: jax.Array) -> jax.Array:
    """``x`` replicated where its type is sharded (Explicit mesh axes)."""
    typed = typed_sharding(x)
    return x if typed is None else reshard(x, NamedSharding(typed.mesh, PartitionSpec()))


def placement_for_shape(placement: Any, shape: tuple[int, ...]) -> Any:
    """``placement`` (a param's, from :func:`placement_of`) for state of another ``shape`` of
    the same rank (block means, factored rows): the mesh axes of a dimension they no longer
    divide are dropped (that dimension is replicated)."""
    if not isinstance(placement, NamedSharding):
        return placement
    entries = spec_entries(placement.spec, len(shape))
    kept = []
    for dim, entry in zip(shape, entries, strict=True):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        size = math.prod(placement.mesh.shape[axis] for axis in axes)
        kept.append(entry if axes and dim % size == 0 else None)
    return NamedSharding(placement.mesh, PartitionSpec(*kept), memory_kind=placement.memory_kind)


def without_axes_of(x: jax.Array, other: jax.Array) -> jax.Array:
    """``x`` resharded so that its type uses none of the mesh axes in ``other``'s: the two then
    broadcast against each other (factors that ZeRO-1 split over one axis on different
    dimensions)."""
    typed, other_typed = typed_sharding(x), typed_sharding(other)
    if typed is None or other_typed is None:
        return x

    def axes(entry: Any) -> tuple[str, ...]:
        return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)

    taken = {a for entry in other_typed.spec for a in axes(entry)}
    entries = spec_entries(typed.spec, x.ndim)
    kept = [None if set(axes(entry)) & taken else entry for entry in entries]
    return reshard(x, NamedSharding(typed.mesh, PartitionSpec(*kept)))
