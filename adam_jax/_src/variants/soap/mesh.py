"""Where SOAP's arrays sit on the mesh set by ``jax.set_mesh``: an array replicated
(:func:`_whole`), given another's typed sharding (:func:`_like`) or split over a mesh axis by its
first dimension (:func:`_spread`), and the size of that axis (:func:`_axis_size`)."""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

from adam_jax.rules import reshard, typed_sharding


def _whole(x: jax.Array) -> jax.Array:
    """``x`` replicated on Auto mesh axes (constrained so under ``jit``, moved so eagerly),
    where the compiler would otherwise split a factor's sum over a sharded dimension: the
    factors would be summed in another order than on one device."""
    if isinstance(x, jax.core.Tracer):
        sharding = jax.typeof(x).sharding
        if isinstance(sharding, NamedSharding) and not sharding.mesh.empty:
            return jax.lax.with_sharding_constraint(
                x, NamedSharding(sharding.mesh, PartitionSpec())
            )
    elif isinstance(x, jax.Array):
        placed = x.sharding
        if isinstance(placed, NamedSharding) and not placed.is_fully_replicated:
            whole = NamedSharding(placed.mesh, PartitionSpec(), memory_kind=placed.memory_kind)
            return jax.device_put(x, whole)
    return x


def _like(x: jax.Array, other: jax.Array) -> jax.Array:
    """``x`` with ``other``'s typed sharding (if any)."""
    return reshard(x, typed_sharding(other))


def _axis_size(axis: str | tuple[str, ...]) -> int:
    """The devices of mesh axis ``axis`` (of each of a tuple of axes) of the mesh set by
    ``jax.set_mesh``."""
    mesh = jax.sharding.get_abstract_mesh()
    names = axis if isinstance(axis, tuple) else (axis,)
    if not set(names) <= set(mesh.axis_names):
        raise ValueError(
            f"block_axis {axis!r} must name axes of the mesh set by jax.set_mesh(mesh) "
            f"around init and update, got a mesh with axes {mesh.axis_names}"
        )
    return math.prod(mesh.shape[name] for name in names)


def _spread(x: jax.Array, axis: str | tuple[str, ...]) -> jax.Array:
    """``x`` with its first dimension split over mesh ``axis`` (or a tuple of axes, of the mesh
    set by ``jax.set_mesh``): in its type on Explicit axes, constrained so on Auto ones, moved
    so eagerly."""
    spec = PartitionSpec(axis)
    if not isinstance(x, jax.core.Tracer):
        return jax.device_put(x, NamedSharding(jax.sharding.get_mesh(), spec))
    mesh = jax.sharding.get_abstract_mesh()
    sharding = NamedSharding(mesh, spec)
    names = axis if isinstance(axis, tuple) else (axis,)
    explicit = jax.sharding.AxisType.Explicit
    if all(mesh.axis_types[mesh.axis_names.index(name)] == explicit for name in names):
        return reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)
