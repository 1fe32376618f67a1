"""Where SOAP's arrays sit on the mesh set by ``jax.set_mesh``: an array replicated
(:func:`_whole`), given another's typed sharding (:func:`_like`) or split over a mesh axis by its
first dimension (:func:`_spread`), and the size of that axis (:func:`_axis_size`)."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

from adam_jax._src.typed_sharding import reshard, typed_sharding


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


def _axis_size(axis: str) -> int:
    """The size of mesh axis ``axis`` of the mesh set by ``jax.set_mesh``."""
    mesh = jax.sharding.get_abstract_mesh()
    if axis not in mesh.axis_names:
        raise ValueError(
            f"block_axis {axis!r} must be an axis of the mesh set by jax.set_mesh(mesh) "
            f"around init and update, got a mesh with axes {mesh.axis_names}"
        )
    return mesh.shape[axis]


def _spread(x: jax.Array, axis: str) -> jax.Array:
    """``x`` with its first dimension split over mesh ``axis`` (of the mesh set by
    ``jax.set_mesh``): in its type on an Explicit axis, constrained so on an Auto one, moved
    so eagerly."""
    spec = PartitionSpec(axis)
    if not isinstance(x, jax.core.Tracer):
        return jax.device_put(x, NamedSharding(jax.sharding.get_mesh(), spec))
    mesh = jax.sharding.get_abstract_mesh()
    sharding = NamedSharding(mesh, spec)
    if mesh.axis_types[mesh.axis_names.index(axis)] == jax.sharding.AxisType.Explicit:
        return reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)
