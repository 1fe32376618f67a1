"""The block layout of quantized tensors and its sharding.

A stored tensor is a :class:`QuantizedArray`: codes with the tensor's shape and one float32
scale per block. This module picks the blocks (tiles over the last two axes), shards the scales
with the codes, reshapes tensors into blocks and back, and quantizes arrays block-wise with the
dynamic map (:func:`quantize_blockwise`, :func:`dequantize_blockwise`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from adam_jax._src.quantization.dynamic_map import decode, encode
from adam_jax._src.typed_sharding import reshard, spec_entries, typed_sharding

# --------------------------------------------------------------------------------------------
# Block layout and its sharding.
#
# A block is a tile over the last two axes (the last one for a vector): ``rows`` consecutive
# rows by ``columns`` consecutive elements of a row. The scales have the tensor's shape with
# those two axes divided by the tile (rounded up), so the tile is read back from the shapes.
# ``init`` picks tiles of at most ``block_size`` elements: runs along the last axis, or, when
# that axis is short, a few whole rows (contiguous in memory, as the paper's blocks).
# --------------------------------------------------------------------------------------------


class QuantizedArray(NamedTuple):
    """Stored form of one quantized tensor.

    Attributes:
      codes: ``uint8`` array with the shape of the original tensor (index into the map).
      absmax: float32 scales, one per block, with the rank of ``codes``: its shape is
        ``codes.shape`` with the last two axes (the last one for a vector) divided by the
        block's extent along them, rounded up.

    As a tree of shardings (:func:`moment_sharding`) its fields are those arrays' shardings.
    """

    codes: Any
    absmax: Any


def is_quantized(stored: Any) -> bool:
    """Whether a stored moment leaf is quantized (an 8-bit :class:`QuantizedArray`, a 4-bit
    ``PackedQuantizedArray`` or ``Rank1QuantizedArray``, or a mapping of their fields); use it
    as the ``is_leaf`` of ``jax.tree.map`` or ``optax.tree_map_params`` to see a quantized
    moment as one leaf."""
    return hasattr(stored, "codes") and (hasattr(stored, "absmax") or hasattr(stored, "row_max"))


def _blocked_axes(ndim: int) -> int:
    """How many trailing axes a block spans: the last two, or one for a vector."""
    return min(ndim, 2)


def _tile(length: int, count: int) -> int:
    """Extent of a block along an axis of ``length`` cut into ``count`` blocks."""
    return math.ceil(length / count)


def largest_divisor_at_most(n: int, bound: int) -> int:
    divisors = (d for k in range(1, math.isqrt(n) + 1) if n % k == 0 for d in (k, n // k))
    return max(d for d in divisors if d <= bound)


def _shard_count(mesh: Any, entry: Any, explicit_only: bool = False) -> int:
    """How many pieces the mesh axes of one ``PartitionSpec`` entry cut an array axis into."""
    names = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    return math.prod(
        mesh.shape[name]
        for name in names
        if not explicit_only or types[name] == jax.sharding.AxisType.Explicit
    )


def _whole_blocks(length: int, count: int, shards: int) -> bool:
    """Whether each of ``shards`` equal pieces of an axis holds whole blocks (no padding)."""
    tile = _tile(length, count)
    return count * tile == length and length % shards == 0 and (length // shards) % tile == 0


def _local_length(length: int, sharding: Any, entry: Any) -> int:
    """Length of the shard of an axis split over the Explicit mesh axes of ``entry``."""
    shards = _shard_count(sharding.mesh, entry, explicit_only=True) if entry is not None else 1
    return length // shards if length % shards == 0 else length


def scale_shape_for(shape: tuple[int, ...], block_size: int, sharding: Any) -> tuple[int, ...]:
    """The scales' shape for a param of ``shape`` placed with ``sharding``.

    Runs of ``ceil(length / ceil(length / block_size))`` along the last axis; when the last
    axis is split over Explicit mesh axes, the longest run of at most ``block_size`` that tiles
    a shard. When a whole row fits a block twice, blocks take the largest number of rows of at
    most ``block_size`` elements that tiles the rows (or their shard, likewise).
    """
    entries: tuple[Any, ...] = (None,) * len(shape)
    if isinstance(sharding, NamedSharding):
        entries = spec_entries(sharding.spec, len(shape))
    length = shape[-1]
    local = _local_length(length, sharding, entries[-1])
    if local < length:
        columns = length // largest_divisor_at_most(local, block_size)
    else:
        columns = max(1, math.ceil(length / block_size))
    if len(shape) == 1 or columns > 1 or not 0 < 2 * length <= block_size or shape[-2] == 0:
        return shape[:-1] + (columns,)
    local_rows = _local_length(shape[-2], sharding, entries[-2])
    rows_per_block = largest_divisor_at_most(local_rows, block_size // length)
    return shape[:-2] + (shape[-2] // rows_per_block, 1)


def scale_sharding_for(sharding: Any, shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> Any:
    """The scales' sharding: the param's, except on a blocked axis whose shards do not hold
    whole blocks, which is replicated."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    entries = list(spec_entries(sharding.spec, len(shape)))
    for axis in range(len(shape) - _blocked_axes(len(shape)), len(shape)):
        shards = _shard_count(sharding.mesh, entries[axis])
        if shards > 1 and not _whole_blocks(shape[axis], scale_shape[axis], shards):
            entries[axis] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*entries), memory_kind=sharding.memory_kind)


def _blocks_shape(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape :func:`_to_blocks` gives a tensor of ``shape``: ``(..., r, n/r, c, m/c)``."""
    blocked = _blocked_axes(len(shape))
    trailing = zip(shape[len(shape) - blocked :], scale_shape[len(shape) - blocked :], strict=True)
    split = (d for length, count in trailing for d in (count, _tile(length, count)))
    return tuple(shape[: len(shape) - blocked]) + tuple(split)


def _to_blocks(x: jax.Array, scale_shape: tuple[int, ...]) -> jax.Array:
    """``x`` with each blocked axis split in (blocks, extent), padded with zeros.

    For ``x`` of shape ``(..., n, m)`` and scales ``(..., r, c)``: ``(..., r, n/r, c, m/c)``.
    On an Explicit mesh the block counts keep the axes' sharding.
    """
    if len(scale_shape) != x.ndim:
        raise ValueError(
            f"block scales of shape {scale_shape} for a tensor of shape {x.shape}: the scales "
            "have the tensor's rank (8-bit states from before blocks followed the tensor's axes "
            "have a flat row of scales; initialize them anew)"
        )
    blocks_shape = _blocks_shape(tuple(x.shape), scale_shape)
    blocked = _blocked_axes(x.ndim)
    lead = x.shape[: x.ndim - blocked]
    trailing = list(zip(x.shape[x.ndim - blocked :], scale_shape[x.ndim - blocked :], strict=True))
    typed = typed_sharding(x)
    out_sharding = None
    if typed is not None:
        entries = list(spec_entries(typed.spec, x.ndim))
        for axis, (length, count) in enumerate(trailing, start=len(lead)):
            shards = _shard_count(typed.mesh, entries[axis])
            if shards > 1 and not _whole_blocks(length, count, shards):
                entries[axis] = None  # blocks straddle shards (a layout made for another mesh)
        x = reshard(x, NamedSharding(typed.mesh, PartitionSpec(*entries)))
        split_entries = (e for entry in entries[len(lead) :] for e in (entry, None))
        out_spec = PartitionSpec(*entries[: len(lead)], *split_entries)
        out_sharding = NamedSharding(typed.mesh, out_spec)
    pads = [count * _tile(length, count) - length for length, count in trailing]
    if any(pads):
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad) for pad in pads])
    return jax.lax.reshape(x, blocks_shape, out_sharding=out_sharding)


def _ragged(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> bool:
    """Whether the blocks of the last axis overrun it (its last block is shorter), so that
    :func:`_to_blocks` pads: then the scales have the tensor's rank and its other axes."""
    count = scale_shape[-1]
    return len(scale_shape) == len(shape) and count * _tile(shape[-1], count) != shape[-1]


def _ragged_absmax(x: jax.Array, scale_shape: tuple[int, ...]) -> jax.Array:
    """The largest magnitude in each block of ``x``, whose last axis's last block is shorter
    (:func:`_ragged`): one windowed maximum over ``x``, padded inside the reduction, with no
    padded or sliced copy of ``x``."""
    count = scale_shape[-1]
    tile = _tile(x.shape[-1], count)
    window = (1,) * (x.ndim - 1) + (tile,)
    pads = [(0, 0)] * (x.ndim - 1) + [(0, count * tile - x.shape[-1])]
    return jax.lax.reduce_window(jnp.abs(x), 0.0, jax.lax.max, window, window, pads)


def _ragged_scales(scales: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Each element's block scale for a tensor of ``shape`` whose last axis's last block is
    shorter (:func:`_ragged`)."""
    tile = _tile(shape[-1], scales.shape[-1])
    return jnp.repeat(scales, tile, axis=-1)[..., : shape[-1]]


def _in_place(x: jax.Array, scale_shape: tuple[int, ...]) -> bool:
    """Whether blocks of ``x`` are scaled where they lie, not in a padded block layout:
    ragged blocks (a padded copy of a large moment is a large temporary) off Explicit meshes
    (where the block layout keeps the sharding)."""
    return _ragged(x.shape, scale_shape) and typed_sharding(x) is None


def _block_axes(ndim: int) -> tuple[int, ...]:
    """The within-block axes of ``_to_blocks``' output for an ``ndim`` array."""
    return (-1,) if _blocked_axes(ndim) == 1 else (-3, -1)


def _from_blocks(blocks: jax.Array, like: jax.Array) -> jax.Array:
    """Inverse of :func:`_to_blocks`: the shape of ``like`` and, on Explicit meshes, its
    sharding."""
    blocked = _blocked_axes(like.ndim)
    lead = like.shape[: like.ndim - blocked]
    padded = tuple(blocks.shape[i] * blocks.shape[i + 1] for i in range(len(lead), blocks.ndim, 2))
    typed = typed_sharding(blocks)
    out_sharding = None
    if typed is not None:
        entries = spec_entries(typed.spec, blocks.ndim)
        merged = PartitionSpec(*entries[: len(lead)], *entries[len(lead) :: 2])
        out_sharding = NamedSharding(typed.mesh, merged)
    x = jax.lax.reshape(blocks, lead + padded, out_sharding=out_sharding)
    if padded != like.shape[like.ndim - blocked :]:
        x = x[tuple(slice(0, n) for n in like.shape)]
    return reshard(x, typed_sharding(like))


def _broadcast_scales(scales: jax.Array, blocks: jax.Array) -> jax.Array:
    """Scales of shape ``(..., r, c)`` against blocks ``(..., r, n/r, c, m/c)``, with the
    blocks' sharding of the block axes on Explicit meshes."""
    axes = tuple(blocks.ndim + a for a in _block_axes(scales.ndim))
    typed = typed_sharding(blocks)
    if typed is not None:
        entries = spec_entries(typed.spec, blocks.ndim)
        kept = PartitionSpec(*(e for axis, e in enumerate(entries) if axis not in axes))
        scales = reshard(scales, NamedSharding(typed.mesh, kept))
    return jnp.expand_dims(scales, axes)


# Jitted so that an eager update runs each codec as one compiled call (inlined under jit).
@functools.partial(jax.jit, static_argnames=("scale_shape", "signed"))
def quantize(x: jax.Array, scale_shape: tuple[int, ...], signed: bool) -> QuantizedArray:
    absmax = block_absmax(x, scale_shape, initial=0.0)
    codes = encoded_by(x, absmax, functools.partial(encode, signed=signed))
    return QuantizedArray(codes=codes, absmax=absmax)


# The two halves of quantize, which the two passes of a GPU's step take apart: the block
# maxima, one reduction whose inputs fuse into it (a reduction's ``initial`` adds a kernel of
# its own, and a block's maximum magnitude is >= 0 without it), and the codes, elementwise in
# the leaf's own shape, so that they fuse with whatever else reads the moment (in the blocks'
# shape, the decode of the old moment would be computed into memory rather than fused) and
# keep the leaf's sharding where blocks straddle its shards (under Auto mesh axes).


#: The fewest elements of a leaf stepped in two passes on a GPU
#: (:meth:`adam_jax.MomentStorage.in_two_passes`): where the bytes it saves (18 of 40 a
#: parameter in 8 bits) take an H100 longer than a kernel's launch.
TWO_PASSES_MIN_SIZE = 1 << 19


def block_absmax(
    x: jax.Array, scale_shape: tuple[int, ...], initial: float | None = None
) -> jax.Array:
    """The largest magnitude in each block of ``x`` (float32, of ``scale_shape``): the scales
    :func:`quantize` stores. ``initial`` starts the reduction of blocks that follow one another
    (0.0 in the one-pass codecs: an 8-bit AdamW step on 4000 x 4000 + 768 x 3072 took XLA:CPU
    145 ms with it, 185 ms without; a GPU launches a kernel of its own for it)."""
    x = x.astype(jnp.float32)
    if _in_place(x, scale_shape):
        return _ragged_absmax(x, scale_shape)
    blocks = jnp.abs(_to_blocks(x, scale_shape))
    return jnp.max(blocks, axis=_block_axes(x.ndim), initial=initial)


def encoded_by(
    x: jax.Array, absmax: jax.Array, encoder: Callable[[jax.Array], jax.Array]
) -> jax.Array:
    """``encoder`` (elementwise) of ``x`` (float32) over each element's block scale in
    ``absmax`` (from :func:`block_absmax`; a block of zeros is divided by 1), in the shape of
    ``x``: what :func:`quantize` stores. Encoded in the leaf's own shape over spread scales
    (where a GPU fuses it with what reads the moment, and where blocks straddle shards under
    Auto mesh axes, the leaf's sharding kept; on Explicit meshes the scales are spread through
    the blocks' layout, which keeps theirs); for blocks of rows that would be padded, in the
    blocks' shape."""
    x = x.astype(jnp.float32)
    spread = _spread_shape(x, absmax.shape)
    if spread is None and typed_sharding(x) is not None and len(absmax.shape) == x.ndim:
        # Explicit meshes: the scales spread in the blocks' layout, which keeps the sharding,
        # then merged to the leaf's; the leaf itself divided where it lies, as elsewhere.
        blocks = _to_blocks(x, absmax.shape)  # for its layout alone
        spread_blocks = jnp.broadcast_to(_broadcast_scales(absmax, blocks), blocks.shape)
        scales = _from_blocks(spread_blocks, x)
        return encoder(x / jnp.where(scales > 0, scales, 1.0))
    if spread is None:
        safe = jnp.where(absmax > 0, absmax, 1.0)
        blocks = _to_blocks(x, absmax.shape) / jnp.expand_dims(safe, _block_axes(x.ndim))
        return _from_blocks(encoder(blocks), x)
    if _ragged(x.shape, absmax.shape):
        scales = _ragged_scales(absmax, x.shape)
    else:
        scales = _spread(absmax, spread, x.shape)
    return encoder(x / jnp.where(scales > 0, scales, 1.0))


def _spread(absmax: jax.Array, spread: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
    """Each element's scale, for a tensor of ``shape`` whose blocks have ``spread`` shape."""
    axes = tuple(len(spread) + a for a in _block_axes(len(shape)))
    return jnp.broadcast_to(jnp.expand_dims(absmax, axes), spread).reshape(shape)


def spreads(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> bool:
    """Whether :func:`element_scales` spreads scales of ``scale_shape`` over a tensor of
    ``shape``: not where blocks of rows would be padded (their scales are then spread in the
    blocks' layout alone)."""
    if len(scale_shape) != len(shape):
        return False
    spread = _blocks_shape(shape, scale_shape)
    return len(shape) == 1 or spread[-4] * spread[-3] == shape[-2]


def element_scales(absmax: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Each element's block scale for a tensor of ``shape``, in that shape (where
    :func:`spreads`; off Explicit meshes)."""
    scale_shape = tuple(absmax.shape)
    if _ragged(shape, scale_shape):
        return _ragged_scales(absmax, shape)
    return _spread(absmax, _blocks_shape(shape, scale_shape), shape)


def _spread_shape(x: jax.Array, scale_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The blocks' shape (:func:`_to_blocks`) where each element's scale can be spread over
    ``x`` in its own shape (a ragged last axis included), or ``None``: on Explicit meshes and
    where blocks of rows would be padded."""
    if typed_sharding(x) is not None or len(scale_shape) != x.ndim:
        return None  # (:func:`_to_blocks` refuses scales of another rank)
    spread = _blocks_shape(tuple(x.shape), scale_shape)
    if x.ndim > 1 and spread[-4] * spread[-3] != x.shape[-2]:
        return None
    return spread


def quantize_blockwise(
    x: jax.Array, *, block_size: int = 256, signed: bool = True
) -> QuantizedArray:
    """Quantizes ``x`` block-wise to 8 bits with the dynamic map.

    Blocks hold at most ``block_size`` elements: equal runs along the last axis
    (``ceil(x.shape[-1] / block_size)`` per row, the last one shorter), or, when a row fits a
    block twice, the largest number of whole rows that fits and divides the number of rows.

    Args:
      x: a real array (any float dtype, at least one axis). For ``signed=False`` it must be
        >= 0.
      block_size: the most elements that share one scale, >= 1.
      signed: which map to use, see :func:`create_dynamic_map`.

    Returns:
      A :class:`QuantizedArray` with ``codes.shape == x.shape`` and scales of the same rank.

    Example:
      >>> import jax.numpy as jnp
      >>> from adam_jax import quantization
      >>> x = jnp.array([[0.5, -1.0, 0.0], [2.0, 1.0, 4.0]])
      >>> print(quantization.quantize_blockwise(x).absmax)  # one block of both rows
      [[4.]]
      >>> q = quantization.quantize_blockwise(x, block_size=3)  # a block per row
      >>> print(q.absmax.shape, quantization.dequantize_blockwise(q))
      (2, 1) [[ 0.50078124 -0.99296874  0.        ]
       [ 2.003125    0.990625    4.        ]]
    """
    x = jnp.asarray(x)
    if jnp.iscomplexobj(x):
        raise TypeError("quantize_blockwise supports real arrays only")
    if x.ndim == 0:
        raise ValueError("quantize_blockwise needs an array with at least one axis")
    if block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size}")
    return quantize(x, scale_shape_for(x.shape, block_size, None), signed)


def dequantize_blockwise(
    q: QuantizedArray, *, signed: bool = True, dtype: Any = jnp.float32
) -> jax.Array:
    """Inverse of :func:`quantize_blockwise`: ``absmax[block] * map[code]``.

    The blocks are read from the shapes of the codes and the scales.

    Example:
      >>> import jax.numpy as jnp
      >>> from adam_jax import quantization
      >>> q = quantization.quantize_blockwise(jnp.array([1.0, -0.5, 0.25, 0.0]))
      >>> print(quantization.dequantize_blockwise(q, dtype=jnp.bfloat16))
      [1 -0.5 0.248047 0]
    """
    return _dequantize(jnp.asarray(q.codes), jnp.asarray(q.absmax), signed).astype(dtype)


@functools.partial(jax.jit, static_argnames=("signed",))
def _dequantize(codes: jax.Array, absmax: jax.Array, signed: bool) -> jax.Array:
    return times_scales(decode(codes, signed), absmax)


def times_scales(values: jax.Array, absmax: jax.Array) -> jax.Array:
    """Decoded ``values`` (float32) times each element's block scale in ``absmax``: the
    scales spread over the leaf in its own shape where they can be (a GPU then fuses the
    decode into what reads the moment), else in the blocks' layout."""
    absmax = absmax.astype(jnp.float32)
    if _in_place(values, absmax.shape):
        return values * _ragged_scales(absmax, values.shape)
    spread = _spread_shape(values, absmax.shape)
    if spread is not None:
        return values * _spread(absmax, spread, values.shape)
    blocks = _to_blocks(values, absmax.shape)
    return _from_blocks(blocks * _broadcast_scales(absmax, blocks), values)
