"""The shapes SOAP works in: a leaf's working shape (:func:`merged_shape`, the authors'
``merge_dims``), which of its dimensions get a Kronecker factor, how they are cut into blocks of
one shape per group (:class:`BlockGroup`), and where each block's factors sit in the state's flat
vector (:class:`SoapLayout`)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from adam_jax._src.variants.soap.mesh import _axis_size


def merged_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """The authors' ``merge_dims``: consecutive dimensions merged while their product stays
    at most ``max_precond_dim`` (a larger dimension stays alone).

    Example:
      >>> from adam_jax._src.variants.soap import merged_shape
      >>> print(merged_shape((2, 2, 4), 4), merged_shape((3, 4), 100))
      (4, 4) (12,)
      >>> print(merged_shape((20000, 3), 100))
      (20000, 3)
    """
    merged: list[int] = []
    current = 1
    for size in shape:
        if current * size > max_precond_dim:
            if current > 1:
                merged.append(current)
                current = size
            else:
                merged.append(size)
                current = 1
        else:
            current *= size
    if current > 1 or not merged:
        merged.append(current)
    return tuple(merged)


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """Blocks of a leaf that share one shape, as one batch.

    Along each dimension of the leaf's working shape the group covers the range
    ``[start, stop)`` of ``spans``, cut into ``counts`` blocks of ``sizes`` values; its
    blocks are the cartesian product of those cuts, in row-major order of their block
    coordinates (the last dimension's fastest).
    """

    spans: tuple[tuple[int, int], ...]
    counts: tuple[int, ...]
    sizes: tuple[int, ...]
    factored: tuple[bool, ...]

    @property
    def n(self) -> int:
        """The number of blocks."""
        return math.prod(self.counts)

    @property
    def factors(self) -> tuple[int | None, ...]:
        """Per dimension: the size of each block's factor, or None (identity)."""
        return tuple(s if f else None for s, f in zip(self.sizes, self.factored, strict=True))

    @property
    def stride(self) -> int:
        """The number of values of one block's flattened factors."""
        return sum(d * d for d in self.factors if d is not None)

    def split(self, x: jax.Array) -> jax.Array:
        """The group's blocks of ``x`` (in the working shape), as ``(n, *sizes)``."""
        k = len(self.sizes)
        part = x[tuple(slice(a, b) for a, b in self.spans)]
        interleaved = [v for pair in zip(self.counts, self.sizes, strict=True) for v in pair]
        part = part.reshape(interleaved).transpose([*range(0, 2 * k, 2), *range(1, 2 * k, 2)])
        return part.reshape(self.n, *self.sizes)

    def merge(self, blocks: jax.Array) -> jax.Array:
        """The inverse of :meth:`split`: the group's range of the working shape."""
        k = len(self.sizes)
        x = blocks.reshape(*self.counts, *self.sizes)
        x = x.transpose([i for d in range(k) for i in (d, k + d)])
        return x.reshape([b - a for a, b in self.spans])


@dataclasses.dataclass(frozen=True)
class SoapLayout:
    """Which dimensions of a leaf SOAP preconditions, as the authors decide it, and how they
    are cut into blocks (``block_size``).

    Blocks and the order of their state: along each dimension with a factor (of at most
    ``max_precond_dim`` values) the working shape is cut into ``n = size // block_size`` full
    blocks and, where ``block_size`` does not divide it, one last block of the remainder; a
    dimension without factor stays whole. The blocks of equal shape form a
    :class:`BlockGroup`; the groups come in row-major order of their choice, per dimension, of
    the full blocks before the last one (the group of full blocks first), the blocks of a
    group in row-major order of their coordinates, and each block's factors in dimension
    order, flattened: without blocks (or with one block), the unblocked layout.

    The devices the blocks are spread over are those of ``block_axis`` on the mesh set by
    ``jax.set_mesh``, or a count given explicitly (``device_count``, :meth:`on_devices`: the
    layout of a state written on another mesh, say).

    ``stacked``: the layout of a stack of blocks (:mod:`~adam_jax._src.variants.soap.stacks`),
    a leaf ``(n, *sizes)`` of ``n`` blocks of one shape: its working shape the blocks one
    after another along the first dimension, ``(n * sizes[0], *sizes[1:])``, one group of
    ``n`` blocks, a dimension of a block with a factor where it is at most
    ``max_precond_dim`` (as the blocks were cut from leaves).
    """

    max_precond_dim: int
    merge_dims: bool
    precondition_1d: bool
    block_size: int | None = None
    block_axis: str | tuple[str, ...] | None = None
    device_count: int | None = None
    stacked: bool = False

    @property
    def devices(self) -> int:
        """``device_count`` where given, else the size of ``block_axis`` on the mesh set by
        ``jax.set_mesh`` (1 without it)."""
        if self.device_count is not None:
            return self.device_count
        if self.block_axis is None:
            return 1
        return _axis_size(self.block_axis)

    def on_devices(self, devices: int) -> SoapLayout:
        """This layout with its blocks spread over ``devices`` devices (an integer >= 1),
        whatever the mesh: the placement, size and order of the vectors of a state spread over
        that many.

        Example:
          >>> from adam_jax._src.variants.soap import SoapLayout
          >>> layout = SoapLayout(10000, merge_dims=False, precondition_1d=False, block_size=8)
          >>> [layout.on_devices(n).size((24, 16)) for n in (1, 4, 8)]  # 6 blocks of 128 values
          [768, 1024, 1024]
        """
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
            raise ValueError(f"devices must be an integer >= 1, got {devices!r}")
        return dataclasses.replace(self, device_count=devices)

    def placement(self, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """The devices a leaf's blocks are spread over (1: kept whole), and per group the
        blocks each device owns (its slots): ``ceil(n / devices)``, the last devices' last
        slots empty where ``devices`` does not divide ``n``. A leaf of one block is kept
        whole on every device."""
        groups = self.groups(shape)
        devices = self.devices if sum(g.n for g in groups) > 1 else 1
        return devices, tuple(-(-g.n // devices) for g in groups)

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the leaf is preconditioned in (merged for ``merge_dims``, tensors of two
        or more dimensions only)."""
        if self.stacked:
            return (shape[0] * shape[1], *shape[2:])
        if self.merge_dims and len(shape) >= 2:
            return merged_shape(shape, self.max_precond_dim)
        return tuple(shape)

    def factors(self, shape: tuple[int, ...]) -> tuple[int | None, ...]:
        """Per dimension of :meth:`shape`: the size of its factor, or None (identity)."""
        if self.stacked:
            return tuple(d if d <= self.max_precond_dim else None for d in shape[1:])
        working = self.shape(shape)
        if len(shape) == 1 and not self.precondition_1d:
            return (None,)
        return tuple(d if d <= self.max_precond_dim else None for d in working)

    def groups(self, shape: tuple[int, ...]) -> tuple[BlockGroup, ...]:
        """The leaf's blocks, by group, in the order of the state (see the class)."""
        factors = self.factors(shape)
        if self.stacked:
            return (
                BlockGroup(
                    spans=tuple((0, w) for w in self.shape(shape)),
                    counts=(shape[0], *(1 for _ in shape[2:])),
                    sizes=tuple(shape[1:]),
                    factored=tuple(f is not None for f in factors),
                ),
            )
        per_dim = []
        for w, f in zip(self.shape(shape), factors, strict=True):
            b = self.block_size
            if f is None or b is None or w <= b:
                per_dim.append([((0, w), 1, w, f is not None)])
                continue
            n, r = divmod(w, b)
            cuts = [((0, n * b), n, b, True)]
            if r:
                cuts.append(((n * b, w), 1, r, True))
            per_dim.append(cuts)
        return tuple(
            BlockGroup(
                spans=tuple(c[0] for c in choice),
                counts=tuple(c[1] for c in choice),
                sizes=tuple(c[2] for c in choice),
                factored=tuple(c[3] for c in choice),
            )
            for choice in itertools.product(*per_dim)
        )

    def num_blocks(self, shape: tuple[int, ...]) -> int:
        """The number of blocks of the leaf (1 without blocks)."""
        return sum(g.n for g in self.groups(shape))

    def refreshed_blocks(self, shape: tuple[int, ...]) -> int:
        """The number of blocks with a factor: those whose bases a refresh updates."""
        has_factor = any(f is not None for f in self.factors(shape))
        return self.num_blocks(shape) if has_factor else 0

    def size(self, shape: tuple[int, ...]) -> int:
        """The number of values of the leaf's flattened factors (with the empty slots of
        :meth:`placement`)."""
        devices, slots = self.placement(shape)
        return devices * sum(s * g.stride for s, g in zip(slots, self.groups(shape), strict=True))

    def blocks(self, shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
        """Each block's place in the working shape, in the order of the state.

        Example:
          >>> from adam_jax._src.variants.soap import SoapLayout
          >>> layout = SoapLayout(10000, merge_dims=False, precondition_1d=False, block_size=2)
          >>> [(r.start, r.stop, c.start, c.stop) for r, c in layout.blocks((3, 4))]
          [(0, 2, 0, 2), (0, 2, 2, 4), (2, 3, 0, 2), (2, 3, 2, 4)]
        """
        out = []
        for g in self.groups(shape):
            for index in itertools.product(*(range(c) for c in g.counts)):
                out.append(
                    tuple(
                        slice(a + i * s, a + (i + 1) * s)
                        for (a, _), i, s in zip(g.spans, index, g.sizes, strict=True)
                    )
                )
        return out

    def _block_starts(self, shape: tuple[int, ...]) -> list[tuple[int, tuple[int | None, ...]]]:
        """Per block (in the order of :meth:`blocks`), where its factors start in the state's
        vector and their sizes (per dimension, or None): see :meth:`unpack_blocks`."""
        groups = self.groups(shape)
        _, slots = self.placement(shape)
        sizes = [s * g.stride for s, g in zip(slots, groups, strict=True)]
        part, offsets = sum(sizes), itertools.accumulate(sizes, initial=0)
        out = []
        for g, s, offset in zip(groups, slots, offsets, strict=False):
            for k in range(g.n):
                device, slot = divmod(k, s)
                out.append((device * part + offset + slot * g.stride, g.factors))
        return out

    def unpack_blocks(self, flat: Any, shape: tuple[int, ...]) -> list[list[Any]]:
        """Per block (in the order of :meth:`blocks`), its factors (or eigenbases) from the
        state's flattened ``gg`` (or ``q``) of a leaf of ``shape``: per dimension of
        :meth:`shape`, a matrix, or None. Spread over devices (:meth:`placement`), the vector
        is each device's part in turn, the groups' slots in each, block ``k`` of a group in
        slot ``k % slots`` of device ``k // slots``."""
        out: list[list[Any]] = []
        for start, factors in self._block_starts(shape):
            block: list[Any] = []
            for d in factors:
                if d is None:
                    block.append(None)
                else:
                    block.append(flat[start : start + d * d].reshape(d, d))
                    start += d * d
            out.append(block)
        return out

    def pack_blocks(
        self, blocks: Sequence[Sequence[Any]], shape: tuple[int, ...], dtype: Any = None
    ) -> np.ndarray:
        """The inverse of :meth:`unpack_blocks`: the state's flat vector (a NumPy array of
        :meth:`size` values, on the host) of a leaf of ``shape`` from each block's factors (or
        eigenbases), per dimension a ``d x d`` matrix or None as :meth:`unpack_blocks` gives
        them; the empty slots of :meth:`placement` zero. ``dtype``: the vector's (default: the
        matrices', float32 for a leaf without factors).

        Example:
          >>> import numpy as np
          >>> from adam_jax._src.variants.soap import SoapLayout
          >>> layout = SoapLayout(10000, merge_dims=False, precondition_1d=False, block_size=2)
          >>> flat = np.arange(layout.size((4, 2)), dtype=np.float32)
          >>> blocks = layout.unpack_blocks(flat, (4, 2))
          >>> spread = layout.on_devices(3)  # 2 blocks: the third device's slot empty
          >>> print(spread.pack_blocks(blocks, (4, 2)).reshape(3, -1)[:, ::4])
          [[ 0.  4.]
           [ 8. 12.]
           [ 0.  0.]]
        """
        starts = self._block_starts(shape)
        if len(blocks) != len(starts):
            raise ValueError(
                f"a leaf of shape {shape} has {len(starts)} blocks, got the factors of "
                f"{len(blocks)}"
            )
        present = [np.asarray(m) for block in blocks for m in block if m is not None]
        if dtype is None:
            dtype = present[0].dtype if present else np.float32
        flat = np.zeros((self.size(shape),), dtype)
        for index, ((start, factors), block) in enumerate(zip(starts, blocks, strict=True)):
            if len(block) != len(factors):
                raise ValueError(
                    f"block {index} of a leaf of shape {shape} has {len(factors)} dimensions, "
                    f"got {len(block)} matrices"
                )
            for d, matrix in zip(factors, block, strict=True):
                if (d is None) != (matrix is None) or (
                    d is not None and tuple(np.shape(matrix)) != (d, d)
                ):
                    want = "None" if d is None else f"a {d} x {d} matrix"
                    got = "None" if matrix is None else f"shape {tuple(np.shape(matrix))}"
                    raise ValueError(
                        f"block {index} of a leaf of shape {shape}: expected {want}, got {got}"
                    )
                if d is not None:
                    flat[start : start + d * d] = np.asarray(matrix).reshape(-1)
                    start += d * d
        return flat

    def unpack(self, flat: Any, shape: tuple[int, ...]) -> list[Any]:
        """A leaf's factors (or eigenbases) from their flattened concatenation (the state's
        ``gg`` or ``q`` of a leaf of ``shape``, not cut into blocks): per dimension of
        :meth:`shape`, a ``d x d`` matrix, or None.

        Example:
          >>> import numpy as np
          >>> from adam_jax._src.variants.soap import SoapLayout
          >>> layout = SoapLayout(max_precond_dim=3, merge_dims=False, precondition_1d=False)
          >>> [None if q is None else q.shape for q in layout.unpack(np.arange(9), (4, 3))]
          [None, (3, 3)]
        """
        blocks = self.unpack_blocks(flat, shape)
        if len(blocks) != 1:
            raise ValueError(f"a leaf of shape {shape} has {len(blocks)} blocks: unpack_blocks")
        return blocks[0]
