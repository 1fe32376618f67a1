"""Moments of :class:`adam_jax.FlatParams` buffers kept per packed tensor.

A storage that reduces a moment (block means, factored rows and columns) or whose stored form
depends on the param's shape (4-bit rank-1 normalization) would see a flat buffer as one long
vector. The core instead gives such a buffer a :class:`SegmentedStorage`: the storage of each
packed tensor, applied to that tensor in its own shape, so the state and the steps are those of
the tree. Buffers whose tensors all share one storage that keeps every element in order (a
cast, bfloat16, 8-bit or 4-bit blocks) keep it over the whole buffer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax._src.flat import FlatParams
from adam_jax._src.storage import MomentStorage, storages_for


def _is_flat(node: Any) -> bool:
    return isinstance(node, FlatParams)


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class SegmentedStorage(MomentStorage):
    """The moment of a :class:`adam_jax.FlatParams` buffer kept as one stored form per packed
    tensor, each by that tensor's storage and in its shape.

    The stored form is the tuple of the tensors' stored forms, in the order of the buffer;
    :meth:`load` and :meth:`project` give the concatenation of the tensors' moments (each
    broadcast to its tensor's shape, then raveled) and :meth:`store` splits the buffer's moment
    at the tensors' offsets. It reduces when any of the tensors' storages does.

    Attributes:
      storages: the storage of each packed tensor, in the order of the buffer.
      shapes: the shape of each packed tensor, likewise.
    """

    storages: tuple[MomentStorage, ...]
    shapes: tuple[tuple[int, ...], ...]
    reduces: bool = dataclasses.field(init=False, default=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reduces", any(s.reduces for s in self.storages))

    def init(self, param: Any) -> tuple[Any, ...]:
        # Each tensor's storage sees a stand-in of the tensor: a slice of a buffer has no
        # placement of its own, so the per-tensor state goes to the default device.
        return tuple(
            storage.init(jax.ShapeDtypeStruct(shape, param.dtype))
            for storage, shape in zip(self.storages, self.shapes, strict=True)
        )

    def load(self, stored: Any) -> jax.Array:
        return self._joined(
            storage.load(part) for storage, part in zip(self.storages, stored, strict=True)
        )

    def store(self, value: jax.Array, stored: Any) -> tuple[Any, ...]:
        return tuple(
            storage.store(piece, part)
            for storage, piece, part in zip(self.storages, self._split(value), stored, strict=True)
        )

    def project(self, value: jax.Array, stored: Any) -> jax.Array:
        return self._joined(
            storage.project(piece, part)
            for storage, piece, part in zip(self.storages, self._split(value), stored, strict=True)
        )

    def _split(self, value: jax.Array) -> list[jax.Array]:
        """The buffer's ``value`` cut into its tensors, each in its shape."""
        cuts = np.cumsum([_size(shape) for shape in self.shapes])[:-1]
        pieces = jnp.split(value, cuts) if len(cuts) else [value]
        return [piece.reshape(shape) for piece, shape in zip(pieces, self.shapes, strict=True)]

    def _joined(self, moments: Any) -> jax.Array:
        """The tensors' moments (each of a shape that broadcasts to its tensor's) as one
        buffer."""
        parts = [
            jnp.broadcast_to(moment, shape).reshape(-1)
            for moment, shape in zip(moments, self.shapes, strict=True)
        ]
        return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def _buffer_slots(node: FlatParams) -> list[tuple[int, ...]]:
    """For each buffer of ``node`` that is a leaf: the indices (into its layout's ``slots``) of
    the tensors packed in it, in the buffer's order. Buffers that a mask took out (``None``,
    optax's ``MaskedNode``) are no leaves."""
    slots = node.layout.slots
    return [
        tuple(sorted((i for i, s in enumerate(slots) if s.group == group),
                     key=lambda i: slots[i].offset))
        for group, buffer in enumerate(node.buffers)
        if jax.tree.leaves(buffer)
    ]  # fmt: skip


def packed_tensors(tree: Any) -> list[tuple[tuple[int, ...], ...] | None]:
    """For each leaf of ``tree``: the shapes of the tensors packed in it, in the buffer's
    order, when it is a buffer of :class:`adam_jax.FlatParams`; else ``None``."""
    packed: list[tuple[tuple[int, ...], ...] | None] = []
    for node in jax.tree.leaves(tree, is_leaf=_is_flat):
        if not isinstance(node, FlatParams):
            packed.append(None)
            continue
        for indices in _buffer_slots(node):
            packed.append(tuple(node.layout.slots[i].shape for i in indices))
    return packed


def buffer_storages(spec: Any, tree: Any) -> list[MomentStorage]:
    """One storage per leaf of ``tree``, as :func:`adam_jax.rules.storages_for` chooses, with the
    buffers of :class:`adam_jax.FlatParams` seen as the tensors they pack.

    A :func:`adam_jax.per_leaf` spec chooses from the tree in which each ``FlatParams`` is its
    original tree (of ``jax.ShapeDtypeStruct``, with its paths and shapes). A buffer whose
    tensors all have one storage that neither reduces nor is ``per_tensor`` keeps it over the
    whole buffer; any other buffer gets a :class:`SegmentedStorage` of its tensors' storages.
    """
    unpacked = jax.tree.map(
        lambda node: node.layout.abstract_tree() if isinstance(node, FlatParams) else node,
        tree,
        is_leaf=_is_flat,
    )
    chosen = iter(storages_for(spec, unpacked))
    storages: list[MomentStorage] = []
    for node in jax.tree.leaves(tree, is_leaf=_is_flat):
        if not isinstance(node, FlatParams):
            storages.append(next(chosen))
            continue
        slots = node.layout.slots
        per_tensor = [next(chosen) for _ in slots]  # in the original tree's order
        for indices in _buffer_slots(node):
            storages.append(
                _for_buffer([per_tensor[i] for i in indices], [slots[i].shape for i in indices])
            )
    return storages


def _for_buffer(storages: list[MomentStorage], shapes: list[tuple[int, ...]]) -> MomentStorage:
    """The storage of a buffer packing tensors of ``shapes`` whose storages are ``storages``."""
    first = storages[0]
    if not (first.reduces or first.per_tensor) and all(s == first for s in storages):
        return first
    return SegmentedStorage(tuple(storages), tuple(shapes))
