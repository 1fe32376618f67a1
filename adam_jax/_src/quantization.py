"""8-bit block-wise quantized moments: the implementation of :mod:`adam_jax.quantization`."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from adam_jax._src.storage import MomentStorage
from adam_jax._src.typed_sharding import reshard, spec_entries, typed_sharding

# --------------------------------------------------------------------------------------------
# The dynamic quantization map.
# --------------------------------------------------------------------------------------------


@functools.cache
def _dynamic_map_np(signed: bool, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    # Same construction as bitsandbytes.functional.create_dynamic_map (Dettmers et al., 2022):
    # decade i (i = 0 .. E-1) covers [0.1, 1] * 10**(i - E + 1) with 2**i (signed) or
    # 2**(i + 1) (unsigned) equally spaced midpoints, plus 0 and 1.
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        extra = 0 if signed else 1
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits + extra) + 1
        boundaries = np.linspace(0.1, 1.0, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10.0 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    if additional_items > 0:
        boundaries = np.linspace(0.1, 1.0, additional_items + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10.0 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    out = np.sort(np.asarray(data, dtype=np.float64)).astype(np.float32)
    out.setflags(write=False)
    return out


def create_dynamic_map(signed: bool = True) -> np.ndarray:
    """The 256-entry dynamic quantization map of Dettmers et al. (sorted, float32).

    Args:
      signed: ``True`` for the map over ``[-1, 1]`` (first moment), ``False`` for the map over
        ``[0, 1]`` with one more fraction bit (second moment).

    Returns:
      A read-only numpy array of 256 sorted float32 values containing 0 and 1 exactly.

    Example:
      >>> from adam_jax import quantization
      >>> qmap = quantization.create_dynamic_map(signed=False)
      >>> print(qmap[0], qmap[1], qmap[-2], qmap[-1])
      0.0 3.25e-07 0.9964844 1.0
    """
    return _dynamic_map_np(bool(signed))


def max_quantization_error(signed: bool = True) -> float:
    """Half the largest gap of the map (ends ``-1``/``0`` and ``1`` included).

    For every element ``|x - dequantize(quantize(x))| <= absmax_of_its_block * this``
    (up to float32 rounding of ``x / absmax``).

    Example:
      >>> from adam_jax import quantization
      >>> print(round(quantization.max_quantization_error(signed=True), 6))
      0.007031
    """
    q = create_dynamic_map(signed).astype(np.float64)
    lo = -1.0 if signed else 0.0
    pts = np.unique(np.concatenate([[lo], q, [1.0]]))
    return float(np.max(np.diff(pts)) / 2.0)


# --------------------------------------------------------------------------------------------
# Arithmetic codec.
#
# Among the entries >= 0 of a map, rank 0 is 0, the top rank (128 signed, 255 unsigned) is 1,
# and the ranks between run through the decades i = 0..6 ([1e-7, 1e-6) .. [0.1, 1)). With
# f = 0 (signed) or 1 (unsigned) fraction bits more, decade i holds m = 2**(i + f) entries, and
# rank r > 0 sits in it where u = r + 2**f - 1 has its leading bit e = i + f, at j = u - 2**e:
#
#     entry(r) = 10**(i - 7) * (2m + 18j + 9) / (2m) = (2m + 18j + 9) / (5**(7 - i) * 2**(8 + f))
#
# Numerator and denominator are integers exact in float32, so their correctly rounded quotient
# is the float32 entry of create_dynamic_map. Decoding computes it as a product (a division
# would make XLA keep decoded moments in memory rather than fuse the decode into their users).
# Encoding estimates the rank from the decade and the linear position inside it (never too low,
# at most one too high), then compares with the float32 midpoint of that entry and the one below
# it: the very midpoint a nearest-entry search over the map compares with.
# --------------------------------------------------------------------------------------------


class _Map(NamedTuple):
    fraction_bits: int
    top_rank: int  # rank of the entry 1 among the entries >= 0
    zero_code: int
    top_midpoint: float  # float32 midpoint between 1 and the entry below it
    reciprocal_high: tuple[float, ...]  # 1 / (5**k * 2**(8 + f)) for k = 0..7, 10 leading bits
    reciprocal_low: tuple[float, ...]  # the rest, rounded to float32


@functools.cache
def _map_constants(signed: bool) -> _Map:
    qmap = create_dynamic_map(signed)
    zero_code = int(np.flatnonzero(qmap == 0.0)[0])
    top_midpoint = float((qmap[-2] + np.float32(1.0)) * np.float32(0.5))
    f = 0 if signed else 1
    exact = 1.0 / (5.0 ** np.arange(8) * 2.0 ** (8 + f))
    mantissa, exponent = np.frexp(exact)
    high = np.ldexp(np.floor(mantissa * 2**10) / 2**10, exponent)
    low = (exact - high).astype(np.float32)
    return _Map(
        f, 255 - zero_code, zero_code, top_midpoint, tuple(map(float, high)), tuple(map(float, low))
    )


def _entry_magnitude(rank: jax.Array, signed: bool) -> jax.Array:
    """The map's entry of ``rank`` among its entries >= 0 (float32, see the formula above)."""
    constants = _map_constants(signed)
    f = constants.fraction_bits
    u = jnp.maximum(rank + (2**f - 1), 1).astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(u, jnp.int32)
    leading = jax.lax.bitcast_convert_type(bits & 0x7F800000, jnp.float32)  # m = 2**e
    numerator = 18.0 * u + 9.0 - 16.0 * leading  # 2m + 18j + 9 with j = u - m
    power = (7 + f + 127) - (bits >> 23)  # 7 - i, the power of 5 in the denominator
    high = jnp.full_like(u, constants.reciprocal_high[0])
    low = jnp.full_like(u, constants.reciprocal_low[0])
    for k in range(1, 8):
        high = jnp.where(power == k, constants.reciprocal_high[k], high)
        low = jnp.where(power == k, constants.reciprocal_low[k], low)
    # numerator * high is exact (numerators have at most 14 bits), so the sum rounds once: to
    # the correctly rounded quotient, for every entry of both maps (checked in the tests), with
    # or without an FMA contraction.
    magnitude = numerator * high + numerator * low
    return jnp.where(rank == 0, 0.0, jnp.where(rank == constants.top_rank, 1.0, magnitude))


def _decode(codes: jax.Array, signed: bool) -> jax.Array:
    """The map's entries at ``codes`` (float32), without indexing the map."""
    code = codes.astype(jnp.int32)
    if not signed:
        return _entry_magnitude(code, signed)
    zero = _map_constants(signed).zero_code
    magnitude = _entry_magnitude(jnp.abs(code - zero), signed)
    return jnp.where(code < zero, -magnitude, magnitude)


def _encode(normalized: jax.Array, signed: bool) -> jax.Array:
    """Index of the nearest map entry to ``normalized`` (float32 in [-1, 1]), as uint8.

    Equal to the number of the map's float32 midpoints below ``normalized`` (ties to the lower
    entry), computed elementwise without a search or a table.
    """
    constants = _map_constants(signed)
    f = constants.fraction_bits
    x = normalized.astype(jnp.float32)
    magnitude = jnp.abs(x) if signed else jnp.maximum(x, 0.0)
    # The decade i, as 10**(7 - i) and the number of entries in it, 2**(i + f). A power of ten
    # rounded to float32 may put a value next to it in the wrong decade; the estimate allows it.
    power = jnp.full_like(magnitude, 1e7)
    count = jnp.full_like(magnitude, float(2**f))
    for i in range(1, 7):
        in_or_above = magnitude >= np.float32(10.0 ** (i - 7))
        power = jnp.where(in_or_above, float(10 ** (7 - i)), power)
        count = jnp.where(in_or_above, float(2 ** (i + f)), count)
    # Interior midpoints of the decade sit at integer positions; the 1/16 bias makes the estimate
    # never too low despite rounding, and at most one too high.
    position = (magnitude * power - 1.0) * (count * (1.0 / 9.0)) + 0.0625
    j = jnp.floor(jnp.where(position > 0.0, position, 0.0))
    j = jnp.where(j < count, j, count - 1.0)
    estimate = count + float(1 - 2**f) + j
    # The estimated entry and the one below it: exact small integers over the common exact
    # denominator 5**(8 - i) * 2**(8 + f), so each division gives the map's float32 entry.
    denominator = 10.0 * power * count
    interior = 10.0 * count + 90.0 * j
    upper = (interior + 45.0) / denominator
    lower = jnp.where(j == 0.0, 10.0 * count - 9.0, interior - 45.0) / denominator
    lower = jnp.where((j == 0.0) & (magnitude < np.float32(1e-6)), 0.0, lower)  # below: zero
    midpoint = (lower + upper) * 0.5
    if signed:
        # A midpoint goes to the lower entry: toward zero when positive, away when negative.
        negative = x < 0
        below = jnp.where(negative, magnitude < midpoint, magnitude <= midpoint)
        # 1 is only a positive entry; negative values at most reach the entry below it.
        top = ~negative & (magnitude > constants.top_midpoint)
        rank = jnp.where(top, float(constants.top_rank), estimate - below)
        zero = float(constants.zero_code)
        code = jnp.where(negative, zero - rank, zero + rank)
    else:
        rank = estimate - (magnitude <= midpoint)
        code = jnp.where(magnitude > constants.top_midpoint, float(constants.top_rank), rank)
    # The integer code, read from the low mantissa bits of code + 2**23 (no clamping convert).
    return jax.lax.bitcast_convert_type(code + float(2**23), jnp.int32).astype(jnp.uint8)


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


def _blocked_axes(ndim: int) -> int:
    """How many trailing axes a block spans: the last two, or one for a vector."""
    return min(ndim, 2)


def _tile(length: int, count: int) -> int:
    """Extent of a block along an axis of ``length`` cut into ``count`` blocks."""
    return math.ceil(length / count)


def _largest_divisor_at_most(n: int, bound: int) -> int:
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


def _scale_shape(shape: tuple[int, ...], block_size: int, sharding: Any) -> tuple[int, ...]:
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
        columns = length // _largest_divisor_at_most(local, block_size)
    else:
        columns = max(1, math.ceil(length / block_size))
    if len(shape) == 1 or columns > 1 or not 0 < 2 * length <= block_size or shape[-2] == 0:
        return shape[:-1] + (columns,)
    local_rows = _local_length(shape[-2], sharding, entries[-2])
    rows_per_block = _largest_divisor_at_most(local_rows, block_size // length)
    return shape[:-2] + (shape[-2] // rows_per_block, 1)


def _scale_sharding(sharding: Any, shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> Any:
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


def _place_like(x: jax.Array, like: Any) -> jax.Array:
    """``x`` placed as the stored leaf ``like``: with its typed sharding on Explicit meshes and,
    outside ``jit``, with its sharding (eager ops on Auto meshes may change a layout's)."""
    typed = typed_sharding(like)
    if typed is not None:
        return reshard(x, typed)
    eager = not isinstance(x, jax.core.Tracer) and isinstance(like, jax.Array)
    if eager and not isinstance(like, jax.core.Tracer) and like.committed:
        return jax.device_put(x, like.sharding)
    return x


def _placement(param: Any) -> Any:
    """Where state like ``param`` goes: the sharding in a traced param's type, a committed
    array's sharding, a ``ShapeDtypeStruct``'s sharding; None for the default device."""
    if isinstance(param, jax.core.Tracer):
        return typed_sharding(param)
    if isinstance(param, jax.Array):
        return param.sharding if param.committed else None
    return getattr(param, "sharding", None)


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
    blocked = _blocked_axes(x.ndim)
    lead = x.shape[: x.ndim - blocked]
    trailing = list(zip(x.shape[x.ndim - blocked :], scale_shape[x.ndim - blocked :], strict=True))
    split = tuple(d for length, count in trailing for d in (count, _tile(length, count)))
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
    return jax.lax.reshape(x, lead + split, out_sharding=out_sharding)


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
def _quantize(x: jax.Array, scale_shape: tuple[int, ...], signed: bool) -> QuantizedArray:
    blocks = _to_blocks(x.astype(jnp.float32), scale_shape)
    absmax = jnp.max(jnp.abs(blocks), axis=_block_axes(x.ndim), initial=0.0)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    codes = _encode(blocks / jnp.expand_dims(safe, _block_axes(x.ndim)), signed)
    return QuantizedArray(codes=_from_blocks(codes, x), absmax=absmax)


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
    return _quantize(x, _scale_shape(x.shape, block_size, None), signed)


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
    blocks = _to_blocks(_decode(codes, signed), absmax.shape)
    scales = _broadcast_scales(absmax.astype(jnp.float32), blocks)
    return _from_blocks(blocks * scales, codes)


# --------------------------------------------------------------------------------------------
# MomentStorage implementation.
# --------------------------------------------------------------------------------------------


def _size(param: Any) -> int:
    return int(np.prod(param.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class BlockwiseQuantized(MomentStorage):
    """Moment storage in 8-bit block-wise dynamic quantization.

    Leaves with at least ``min_size`` elements are stored as :class:`QuantizedArray`
    (``uint8`` codes with the parameter's shape + float32 scales, one per block of the layout in
    the module docstring); smaller leaves, scalars and complex leaves are stored as plain
    float32 (complex64 for complex). Arithmetic always happens in float32: ``load`` dequantizes,
    the optimizer updates the moment, ``store`` re-quantizes, all fused by XLA in the jitted
    step.

    ``init`` places the state like the param (its sharding, committed or not; the sharding in
    its type under ``jit`` on Explicit meshes), so every state leaf of a sharded param is
    sharded too; the module docstring describes the blocks of sharded params.

    ``optax.tree_map_params`` sees the codes and the scales as two params-like leaves (its
    placeholder cannot tell them apart), so a cast of the state casts them too; pass
    ``is_leaf=quantization.is_quantized`` to see an 8-bit moment as one leaf. A state whose
    codes and scales were cast still decodes to the same moments (the codes are small integers,
    exact in any float dtype), and ``store`` writes them back as ``uint8`` codes and float32
    scales: the next update restores the 8-bit form.

    Args:
      block_size: the most elements that share one scale (256 in the paper), >= 1.
      min_size: tensors with fewer elements stay unquantized (4096 in the paper), >= 0.
      signed: ``True`` for the first moment (values of both signs), ``False`` for the second
        moment (non-negative; one more bit of precision).

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> from adam_jax._src.quantization import BlockwiseQuantized
      >>> tx = adam_jax.scale_by_adam(mu_dtype=BlockwiseQuantized(signed=True),
      ...                             nu_dtype=BlockwiseQuantized(signed=False))
      >>> state = tx.init(jnp.zeros((16, 512)))
      >>> print(state.mu.codes.shape, state.mu.absmax.shape)
      (16, 512) (16, 2)
    """

    block_size: int = 256
    min_size: int = 4096
    signed: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size}")
        if self.min_size < 0:
            raise ValueError(f"min_size must be an integer >= 0, got {self.min_size}")

    def quantizes(self, param: Any) -> bool:
        """Whether a leaf like ``param`` is stored quantized (else float32)."""
        complex_ = jnp.issubdtype(param.dtype, jnp.complexfloating)
        return len(param.shape) > 0 and _size(param) >= self.min_size and not complex_

    def init(self, param: Any) -> Any:
        shape = tuple(param.shape)
        placement = _placement(param)
        if not self.quantizes(param):
            complex_ = jnp.issubdtype(param.dtype, jnp.complexfloating)
            dtype = jnp.complex64 if complex_ else jnp.float32
            return jax.lax.full(shape, 0, dtype, sharding=placement)
        scale_shape = _scale_shape(shape, self.block_size, placement)
        zero_code = _map_constants(self.signed).zero_code
        scale_sharding = _scale_sharding(placement, shape, scale_shape)
        return QuantizedArray(
            codes=jax.lax.full(shape, zero_code, jnp.uint8, sharding=placement),
            absmax=jax.lax.full(scale_shape, 0, jnp.float32, sharding=scale_sharding),
        )

    def load(self, stored: Any) -> jax.Array:
        if is_quantized(stored):
            quantized = QuantizedArray(codes=stored.codes, absmax=stored.absmax)
            return dequantize_blockwise(quantized, signed=self.signed)
        return stored

    def store(self, value: jax.Array, stored: Any) -> Any:
        if not is_quantized(stored):
            return value.astype(stored.dtype)
        codes, absmax = _quantize(value, tuple(stored.absmax.shape), self.signed)
        quantized = QuantizedArray(
            codes=_place_like(codes.astype(jnp.uint8), stored.codes),
            absmax=_place_like(absmax.astype(jnp.float32), stored.absmax),
        )
        if isinstance(stored, QuantizedArray):
            return quantized
        # A container that rebuilt the QuantizedArray as a mapping of its fields (as
        # flax.nnx.Optimizer does with its state) gets the same kind of mapping back, so the
        # state keeps one structure from step to step (a lax.scan carry, donation).
        return type(stored)(quantized._asdict())


def is_quantized(stored: Any) -> bool:
    """Whether a stored moment leaf is quantized (a :class:`QuantizedArray` or a mapping of its
    fields); use it as the ``is_leaf`` of ``jax.tree.map`` or ``optax.tree_map_params`` to see a
    quantized moment as one leaf."""
    return hasattr(stored, "codes") and hasattr(stored, "absmax")


def moment_sharding(stored: Any, param_sharding: Any) -> Any:
    """The sharding of one stored moment, from the sharding of its param.

    Codes have the param's shape and take its sharding. The block scales have the param's
    rank and take its sharding too, except on a blocked axis whose shards do not hold whole
    blocks (possible on Auto mesh axes, see the module docstring), which they keep whole. The
    scales' shape comes from ``stored``: derive it as the state will be made (on an Auto mesh,
    ``jax.eval_shape`` of ``init`` gives the layout of every ``init``). Derive the shardings of
    a whole state with ``optax.tree_map_params``::

      state_shardings = optax.tree_map_params(
          tx, quantization.moment_sharding, jax.eval_shape(tx.init, params), param_shardings,
          is_leaf=quantization.is_quantized,
          transform_non_params=lambda _: replicated,  # the step counts
      )

    Args:
      stored: a stored moment leaf (a :class:`QuantizedArray` or a plain array, or their
        ``jax.ShapeDtypeStruct``).
      param_sharding: the ``jax.sharding.NamedSharding`` of the corresponding param.

    Returns:
      ``param_sharding`` for a plain moment, or a :class:`QuantizedArray` of shardings.

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> from adam_jax import quantization
      >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
      >>> stored = quantization.BlockwiseQuantized().init(np.zeros((64, 512)))
      >>> sharding = quantization.moment_sharding(stored, NamedSharding(mesh, P("x")))
      >>> print(stored.absmax.shape, sharding.codes.spec, sharding.absmax.spec)
      (64, 2) P('x',) P('x', None)
    """
    if not is_quantized(stored):
        return param_sharding
    shape, scale_shape = tuple(stored.codes.shape), tuple(stored.absmax.shape)
    scales = _scale_sharding(param_sharding, shape, scale_shape)
    return QuantizedArray(codes=param_sharding, absmax=scales)


def eight_bit_moments(block_size: int = 256, min_size: int = 4096) -> dict[str, BlockwiseQuantized]:
    """``{"mu_dtype": signed storage, "nu_dtype": unsigned storage}`` to splat into an alias.

    Args:
      block_size: the most elements that share one scale, >= 1.
      min_size: leaves with fewer elements keep float32 moments, >= 0.

    Returns:
      The two :class:`BlockwiseQuantized` storages, keyed by the aliases' argument names.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.adamw(1e-3, weight_decay=0.01, **adam_jax.eight_bit_moments())
      >>> state = tx.init(jnp.zeros(10_000))
      >>> print(state[0].mu.codes.dtype, state[0].nu.absmax.shape)
      uint8 (40,)
    """
    return {
        "mu_dtype": BlockwiseQuantized(block_size, min_size, signed=True),
        "nu_dtype": BlockwiseQuantized(block_size, min_size, signed=False),
    }


def state_bytes(state: Any) -> int:
    """Total bytes of all array leaves of an optimizer state (or any pytree).

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> from adam_jax import quantization
      >>> params = jnp.zeros(2**16)
      >>> print(round(quantization.state_bytes(adam_jax.adam(1e-3).init(params)) / params.size, 4))
      8.0001
    """
    return int(
        sum(
            np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
            for x in jax.tree.leaves(state)
            if hasattr(x, "dtype")
        )
    )
