"""A leaf cut into blocks, as batches (:class:`_LeafBlocks`): the moves between the leaf and its
groups' batches of blocks, its state's vector cut by group, and with ``block_axis`` each
device's blocks kept and computed on that device."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from adam_jax._src.variants.soap.factors import _unpack_group, dimension_key
from adam_jax._src.variants.soap.layout import BlockGroup
from adam_jax._src.variants.soap.mesh import _spread, _whole
from adam_jax.rules import replicated


def _assemble(groups: tuple[BlockGroup, ...], parts: list[jax.Array]) -> jax.Array:
    """The working-shape tensor from its groups' ranges (:meth:`BlockGroup.merge`), which
    come in row-major order of their cuts."""
    arrays = list(parts)
    for axis in reversed(range(len(groups[0].spans))):
        cuts = len({g.spans[axis] for g in groups})
        arrays = [
            jnp.concatenate(arrays[j : j + cuts], axis=axis) if cuts > 1 else arrays[j]
            for j in range(0, len(arrays), cuts)
        ]
    return arrays[0]


@dataclasses.dataclass(frozen=True)
class _LeafBlocks:
    """A leaf's groups of blocks: the moves between the leaf (``shape``, viewed in its
    ``working`` shape) and its groups' batches of blocks, and its state's vector of factors
    or bases cut by group. Spread over mesh ``axis`` (:meth:`SoapLayout.placement`), each
    group's batch has ``devices * slots`` blocks (the last empty ones zeros), split over the
    axis, and :meth:`blockwise` computes each device's own blocks on that device."""

    groups: tuple[BlockGroup, ...]
    working: tuple[int, ...]
    shape: tuple[int, ...]
    slots: tuple[int, ...]
    axis: str | tuple[str, ...] | None = None
    devices: int = 1

    def split(self, x: jax.Array) -> list[jax.Array]:
        """Each group's blocks of ``x`` (in the leaf's or the working shape)."""
        xw = x.reshape(self.working)
        batches = [group.split(xw) for group in self.groups]
        if self.axis is None:
            return batches
        return [
            _spread(
                jnp.pad(_whole(b), [(0, self.devices * s - b.shape[0])] + [(0, 0)] * (b.ndim - 1)),
                self.axis,
            )
            for b, s in zip(batches, self.slots, strict=True)
        ]

    def merge(self, blocks: list[jax.Array]) -> jax.Array:
        """The inverse of :meth:`split`, in the leaf's shape."""
        if self.axis is not None:
            # Gathered before the leaf's moves, which the partitioner cannot split by blocks.
            blocks = [
                _whole(replicated(b))[: g.n] for g, b in zip(self.groups, blocks, strict=True)
            ]
        parts = [group.merge(b) for group, b in zip(self.groups, blocks, strict=True)]
        return _assemble(self.groups, parts).reshape(self.shape)

    def parts(self, flat: Any) -> list[list[jax.Array | None]]:
        """Each group's matrices (:func:`_unpack_group`) from the leaf's state vector (one
        device's part of it, inside :meth:`blockwise`); a stack's one group from its batches
        by dimension (:class:`FactorStorage`)."""
        if isinstance(flat, dict):
            (group,) = self.groups
            return [[flat.get(dimension_key(i)) for i in range(len(group.factors))]]
        sizes = (s * g.stride for s, g in zip(self.slots, self.groups, strict=True))
        edges = list(itertools.accumulate(sizes, initial=0))
        return [
            _unpack_group(flat[a:b], group, s)
            for group, s, a, b in zip(self.groups, self.slots, edges[:-1], edges[1:], strict=True)
        ]

    def blockwise(self, fn: Any, *args: Any, shared: tuple[Any, ...] = ()) -> Any:
        """``fn(*args, *shared)``, ``args`` arrays whose first dimension runs over the blocks
        (the groups' batches, the state's vectors), ``shared`` the same on every device;
        spread, each device's blocks on it alone (``jax.shard_map`` over the axis), so that
        no device holds or computes another's."""
        axis = self.axis
        if axis is None:
            return fn(*args, *shared)
        args = jax.tree.map(lambda x: _spread(x, axis), args)
        specs = jax.tree.map(lambda _: PartitionSpec(axis), args)
        shared = jax.tree.map(replicated, shared)
        whole = jax.tree.map(lambda _: PartitionSpec(), shared)
        return jax.shard_map(fn, in_specs=(*specs, *whole), out_specs=PartitionSpec(axis))(
            *args, *shared
        )
