"""4-bit moment storage (Li, Chen and Zhu, NeurIPS 2023): the two 4-bit maps, their codec,
nibble packing, and the two storages of :func:`four_bit_moments`.

First moment (:class:`FourBitBlockwise`): block-wise absmax scales over blocks of 128 and the
signed dynamic-exponent map of 16 entries (the paper's B128/DE). Second moment
(:class:`FourBitRank1`): rank-1 normalization, each element divided by the smaller of the
maxima of its row and its column (of the maxima over all other axes, one per axis, for higher
ranks), and the linear map without zero, ``(k + 1) / 16``, so that no second moment decodes
to zero while its row and column hold any non-zero value (the paper's zero-point problem: a
zero would turn ``1 / (sqrt(v) + eps)`` into ``1 / eps``). Vectors, which have no rows and
columns, take block-wise scales with the same linear map.

Two codes share a byte along the last axis (the low nibble holds the even element), so codes
cost half a byte per element, scales ``4 / 128`` for blocks and ``4 (n + m) / (n m)`` for a
matrix's row and column maxima.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from adam_jax._src.quantization.blocks import (
    TWO_PASSES_MIN_SIZE,
    block_absmax,
    element_scales,
    encoded_by,
    is_quantized,
    largest_divisor_at_most,
    scale_shape_for,
    scale_sharding_for,
    spreads,
    times_scales,
)
from adam_jax._src.storage import MomentStorage, same_container
from adam_jax._src.typed_sharding import (
    place_like,
    placement_for_shape,
    placement_of,
    reshard,
    spec_entries,
    typed_sharding,
    without_axes_of,
)

CODES = 16

# --------------------------------------------------------------------------------------------
# The maps and their codec.
# --------------------------------------------------------------------------------------------


def create_four_bit_map(signed: bool = True) -> np.ndarray:
    """The 16 entries of a 4-bit map (sorted, float32).

    Args:
      signed: ``True`` for the first moment's dynamic-exponent map over ``[-1, 1]`` (Dettmers'
        construction with 3 exponent bits: 0, 1, and seven magnitudes of each sign from
        0.0055 to 0.8875); ``False`` for the second moment's linear map without zero,
        ``1/16, 2/16, ..., 1``.

    Returns:
      A read-only numpy array of 16 sorted float32 values.

    Example:
      >>> from adam_jax import quantization
      >>> print(quantization.create_four_bit_map(signed=True)[7:10])
      [0.     0.0055 0.0325]
      >>> print(quantization.create_four_bit_map(signed=False)[:2])
      [0.0625 0.125 ]
    """
    return _four_bit_map(bool(signed))


@functools.cache
def _four_bit_map(signed: bool) -> np.ndarray:
    if signed:
        # The authors' create_dynamic_map(signed=True, 3, 4), in their arithmetic: the
        # boundaries and midpoints of each decade in float32 (torch.linspace), scaled by its
        # power of ten in float64, rounded to float32 once more.
        data = [0.0, 1.0]
        for i in range(3):
            boundaries = np.linspace(0.1, 1.0, 2**i + 1, dtype=np.float32)
            means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
            data += [sign * 10.0 ** (i - 2) * float(m) for m in means for sign in (1.0, -1.0)]
        entries = np.sort(np.asarray(data)).astype(np.float32)
    else:
        entries = np.arange(1, CODES + 1, dtype=np.float32) / np.float32(CODES)
    entries.setflags(write=False)
    return entries


@functools.cache
def _thresholds(signed: bool) -> tuple[float, ...]:
    """For each pair of neighbouring entries, the largest float32 at or below their exact
    midpoint: a float32 ``x`` is nearer the upper entry (ties to the lower) iff it is above."""
    entries = _four_bit_map(signed).astype(np.float64)
    midpoints = (entries[:-1] + entries[1:]) / 2.0
    rounded = midpoints.astype(np.float32)
    below = np.where(
        rounded.astype(np.float64) > midpoints, np.nextafter(rounded, -np.inf), rounded
    )
    return tuple(float(t) for t in below)


def max_four_bit_error(signed: bool = True) -> float:
    """The largest distance from a value of the map's range to its nearest entry.

    With ``s`` an element's scale (its block's absmax for the first moment, the smaller of its
    row's and column's maxima for the second), ``|x - decoded(x)| <= s * max_four_bit_error``:
    ``0.1125`` for the signed map (at ``-1``, which has no entry, and between 0.2125 and
    0.4375), ``1/16`` for the linear map (at zero, which has no entry; ``1/32`` above 1/16).

    Example:
      >>> from adam_jax import quantization
      >>> print(round(quantization.max_four_bit_error(signed=True), 6))
      0.1125
    """
    entries = _four_bit_map(bool(signed)).astype(np.float64)
    lo = -1.0 if signed else 0.0
    gaps = np.diff(entries) / 2.0
    return float(max(entries[0] - lo, 1.0 - entries[-1], gaps.max()))


def encode_four_bit(normalized: jax.Array, signed: bool) -> jax.Array:
    """Index (int32 in ``[0, 16)``) of the map entry nearest to ``normalized`` (ties to the
    lower entry): the number of the map's midpoints it exceeds, elementwise."""
    x = normalized.astype(jnp.float32)
    code = jnp.zeros(x.shape, jnp.int32)
    for threshold in _thresholds(signed):
        code = code + (x > threshold).astype(jnp.int32)
    return code


def decode_four_bit(codes: jax.Array, signed: bool) -> jax.Array:
    """The map's float32 entries at ``codes``, by selects (no table lookup)."""
    code = codes.astype(jnp.int32)
    if not signed:  # (k + 1) / 16 is exact
        return (code + 1).astype(jnp.float32) * (1.0 / CODES)
    entries = _four_bit_map(signed)
    value = jnp.full(code.shape, float(entries[0]), jnp.float32)
    for k in range(1, CODES):
        value = jnp.where(code == k, float(entries[k]), value)
    return value


# --------------------------------------------------------------------------------------------
# Two codes per byte along the last axis.
# --------------------------------------------------------------------------------------------


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the packed codes of a tensor of ``shape``: the last axis halved, rounded up."""
    return shape[:-1] + ((shape[-1] + 1) // 2,)


def pack(codes: jax.Array) -> jax.Array:
    """Codes (integers in ``[0, 16)``, any shape with one axis at least) two per ``uint8``."""
    # Narrowed first, so that padding and pairing move bytes, not int32 codes.
    codes = codes.astype(jnp.uint8)
    shape = codes.shape
    typed = typed_sharding(codes)
    out_sharding = None
    if typed is not None:
        target = placement_for_shape(typed, packed_shape(shape))
        codes = reshard(codes, NamedSharding(typed.mesh, PartitionSpec(*target.spec)))
        entries = spec_entries(target.spec, len(shape))
        out_sharding = NamedSharding(typed.mesh, PartitionSpec(*entries, None))
    if shape[-1] % 2:
        codes = jnp.pad(codes, [(0, 0)] * (len(shape) - 1) + [(0, 1)])
    pairs = jax.lax.reshape(codes, packed_shape(shape) + (2,), out_sharding=out_sharding)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack(packed: jax.Array, length: int) -> jax.Array:
    """Inverse of :func:`pack` for a last axis of ``length``: ``uint8`` codes."""
    # Each byte broadcast to its two codes' places and shifted there: elementwise, so that a
    # GPU fuses the decode into what reads the moment (a stack is a concatenation, computed
    # into memory).
    shifts = jnp.array([0, 4], jnp.uint8)
    pairs = (packed.astype(jnp.uint8)[..., None] >> shifts) & 15
    typed = typed_sharding(packed)
    out_sharding = None
    if typed is not None:
        out_sharding = NamedSharding(
            typed.mesh, PartitionSpec(*spec_entries(typed.spec, packed.ndim))
        )
    codes = jax.lax.reshape(
        pairs, packed.shape[:-1] + (2 * packed.shape[-1],), out_sharding=out_sharding
    )
    return codes[..., :length] if length % 2 else codes


def nibbles(packed: jax.Array, parity: int) -> jax.Array:
    """The codes of even (``parity=0``, the low nibbles) or odd (``1``) index along the last
    axis of ``packed``, in its shape: elementwise."""
    return (packed.astype(jnp.uint8) >> (4 * parity)) & 15


def paired(even: jax.Array, odd: jax.Array) -> jax.Array:
    """:func:`pack` of the codes whose elements of even and odd index are ``even`` and ``odd``
    (of one shape): elementwise."""
    return even.astype(jnp.uint8) | (odd.astype(jnp.uint8) << 4)


# --------------------------------------------------------------------------------------------
# Stored forms and their codecs.
# --------------------------------------------------------------------------------------------


class PackedQuantizedArray(NamedTuple):
    """A tensor in 4-bit codes with block-wise scales.

    Attributes:
      codes: ``uint8``, two codes per byte along the last axis: the tensor's shape with the
        last axis halved, rounded up (see :func:`packed_shape`).
      absmax: float32 scales, one per block, laid out as :class:`QuantizedArray`'s; when the
        tensor's last axis is odd (the packed codes end in a padding nibble) they have one
        trailing axis of length 1 more, so that the shapes tell the tensor's.
    """

    codes: Any
    absmax: Any


class Rank1QuantizedArray(NamedTuple):
    """A non-negative tensor of two or more axes in 4-bit codes with rank-1 normalization.

    Attributes:
      codes: ``uint8``, two codes per byte along the last axis (see :func:`packed_shape`).
      row_max: float32, the maximum of each row (over the last axis): ``shape[:-1] + (1,)``.
      col_max: float32, the maximum of each column (over all other axes):
        ``(1,) * (ndim - 1) + shape[-1:]``.
    """

    codes: Any
    row_max: Any
    col_max: Any


def _odd_marker(absmax: Any, codes: Any) -> bool:
    return len(absmax.shape) > len(codes.shape)


def _scale_shape(stored: Any) -> tuple[int, ...]:
    """The block scales' shape of a :class:`PackedQuantizedArray`, of the tensor's rank (less
    the odd marker)."""
    return tuple(stored.absmax.shape)[: len(stored.codes.shape)]


def tensor_shape(stored: Any) -> tuple[int, ...]:
    """The shape of the tensor a 4-bit stored form holds, read from its arrays' shapes."""
    packed = tuple(stored.codes.shape)
    if hasattr(stored, "row_max"):
        return packed[:-1] + tuple(stored.col_max.shape[-1:])
    odd = _odd_marker(stored.absmax, stored.codes)
    return packed[:-1] + (2 * packed[-1] - odd,)


@functools.partial(jax.jit, static_argnames=("scale_shape", "signed"))
def quantize_blocks(
    x: jax.Array, scale_shape: tuple[int, ...], signed: bool
) -> tuple[jax.Array, jax.Array]:
    """Packed 4-bit codes and block scales of ``x`` (blocks as the 8-bit layout)."""
    absmax = block_absmax(x, scale_shape, initial=0.0)
    codes = encoded_by(x, absmax, functools.partial(encode_four_bit, signed=signed))
    return pack(codes), absmax


@functools.partial(jax.jit, static_argnames=("length", "signed"))
def dequantize_blocks(codes: jax.Array, absmax: jax.Array, length: int, signed: bool) -> jax.Array:
    """The float32 tensor of last axis ``length`` held in packed codes and block scales (of
    the tensor's rank: without the odd marker)."""
    return times_scales(decode_four_bit(unpack(codes, length), signed), absmax)


@jax.jit
def quantize_rank1(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Packed 4-bit codes of ``|x| / min(row max, column max)`` on the linear map, and the row
    and column maxima."""
    row_max, col_max = rank1_maxima(lambda: x)
    return pack(encode_four_bit(rank1_scaled(x, row_max, col_max), signed=False)), row_max, col_max


def rank1_maxima(x: Callable[[], jax.Array]) -> tuple[jax.Array, jax.Array]:
    """The largest magnitude of each row of ``x()`` (over its last axis) and of each column
    (over all other axes), float32, their axes kept: ``x`` called for each (see
    :meth:`adam_jax.MomentStorage.store_scales`)."""
    row_max = jnp.max(jnp.abs(x().astype(jnp.float32)), axis=-1, keepdims=True)
    return row_max, column_maxima(x())


def column_maxima(x: jax.Array) -> jax.Array:
    """The largest magnitude of each column of ``x`` (over all axes but the last), float32."""
    magnitude = jnp.abs(x.astype(jnp.float32))
    return jnp.max(magnitude, axis=tuple(range(x.ndim - 1)), keepdims=True)


#: The most rows whose column maxima :func:`column_maxima_by_runs` takes first.
COLUMN_RUN = 32
#: The fewest rows of a column reduction that XLA:GPU splits in two itself (jax 0.10.2).
_SPLIT_ROWS = 8192


def column_maxima_by_runs(x: jax.Array) -> jax.Array:
    """:func:`column_maxima`, taken on a GPU's first pass: below :data:`_SPLIT_ROWS` rows, the
    maxima of runs of rows (a divisor of the rows, at most :data:`COLUMN_RUN`) first, then
    theirs, behind a barrier that keeps XLA from merging the two reductions again.

    XLA:GPU computes the input of a column reduction of a few thousand rows into memory rather
    than into the reduction (a second moment's magnitude: 9 MiB for a 3072 x 768 leaf, every
    leaf of a horizontally fused kernel's at once), where it fuses it into the reduction of the
    runs. The same maxima: a maximum does not depend on the order it is taken in. On the CPU
    the barrier keeps the one-pass step from fusing (4-bit AdamW on seven leaves took 1.9x as
    long), so only a GPU's two passes take this form."""
    rows = math.prod(x.shape[:-1])
    run = largest_divisor_at_most(rows, COLUMN_RUN) if rows else 1
    if x.ndim < 2 or rows >= _SPLIT_ROWS or run < 8 or typed_sharding(x) is not None:
        return column_maxima(x)
    magnitude = jnp.abs(x.astype(jnp.float32))
    runs = jnp.max(magnitude.reshape(rows // run, run, x.shape[-1]), axis=1)
    runs = jax.lax.optimization_barrier(runs)
    return jnp.max(runs, axis=0).reshape((1,) * (x.ndim - 1) + x.shape[-1:])


def rank1_scaled(x: jax.Array, row_max: jax.Array, col_max: jax.Array) -> jax.Array:
    """``|x|`` over the smaller of its row's and its column's maximum (1 where that is 0)."""
    scale = jnp.minimum(row_max, col_max)
    return jnp.abs(x.astype(jnp.float32)) / jnp.where(scale > 0, scale, 1.0)


@jax.jit
def dequantize_rank1(codes: jax.Array, row_max: jax.Array, col_max: jax.Array) -> jax.Array:
    """The float32 tensor held in packed codes and its row and column maxima."""
    values = decode_four_bit(unpack(codes, col_max.shape[-1]), signed=False)
    col_max = without_axes_of(col_max, row_max)  # ZeRO-1 may split both over one axis
    scale = jnp.minimum(row_max.astype(jnp.float32), col_max.astype(jnp.float32))
    return values * scale


# --------------------------------------------------------------------------------------------
# The storages.
# --------------------------------------------------------------------------------------------


def _size(param: Any) -> int:
    return int(np.prod(param.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class _FourBitStorage(MomentStorage):
    block_size: int = 128
    min_size: int = 4096
    codes_like_param = False  # two codes a byte

    def __post_init__(self) -> None:
        if (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or (self.block_size < 1)
        ):
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if (
            isinstance(self.min_size, bool)
            or not isinstance(self.min_size, int)
            or (self.min_size < 0)
        ):
            raise ValueError(f"min_size must be an integer >= 0, got {self.min_size!r}")

    def quantizes(self, param: Any) -> bool:
        """Whether a leaf like ``param`` is stored in 4 bits (else float32, complex64 for
        complex params)."""
        if not jnp.issubdtype(param.dtype, jnp.inexact):
            raise ValueError(
                f"{type(self).__name__} stores moments of float params, got a param of dtype "
                f"{jnp.dtype(param.dtype).name} and shape {tuple(param.shape)}"
            )
        complex_ = jnp.issubdtype(param.dtype, jnp.complexfloating)
        return len(param.shape) > 0 and _size(param) >= self.min_size and not complex_

    def _plain(self, param: Any) -> jax.Array:
        complex_ = jnp.issubdtype(param.dtype, jnp.complexfloating)
        dtype = jnp.complex64 if complex_ else jnp.float32
        return jax.lax.full(tuple(param.shape), 0, dtype, sharding=placement_of(param))

    def _blocks_init(self, param: Any, signed: bool) -> PackedQuantizedArray:
        shape = tuple(param.shape)
        placement = placement_of(param)
        packed = packed_shape(shape)
        zero = int(np.flatnonzero(_four_bit_map(signed) == 0.0)[0]) if signed else 0
        codes = jax.lax.full(
            packed, zero | zero << 4, jnp.uint8, sharding=placement_for_shape(placement, packed)
        )
        scale_shape = scale_shape_for(shape, self.block_size, placement)
        scale_sharding = scale_sharding_for(placement, shape, scale_shape)
        if shape[-1] % 2:  # the odd marker: a trailing axis of 1
            scale_shape += (1,)
            if isinstance(scale_sharding, NamedSharding):
                spec = PartitionSpec(*spec_entries(scale_sharding.spec, len(shape)), None)
                scale_sharding = NamedSharding(scale_sharding.mesh, spec)
        absmax = jax.lax.full(scale_shape, 0, jnp.float32, sharding=scale_sharding)
        return PackedQuantizedArray(codes=codes, absmax=absmax)

    def _blocks_load(self, stored: Any, signed: bool) -> jax.Array:
        shape = tensor_shape(stored)
        absmax = jnp.asarray(stored.absmax)
        if _odd_marker(absmax, stored.codes):
            absmax = absmax[..., 0]
        return dequantize_blocks(jnp.asarray(stored.codes), absmax, shape[-1], signed)

    def _blocks_store(self, value: jax.Array, stored: Any, signed: bool) -> Any:
        codes, absmax = quantize_blocks(value, _scale_shape(stored), signed)
        return self._blocks_stored(codes, absmax, stored)

    def in_two_passes(self, stored: Any) -> bool:
        # As 8-bit moments (blocks.TWO_PASSES_MIN_SIZE): a leaf's elements, not its bytes.
        return is_quantized(stored) and math.prod(tensor_shape(stored)) >= TWO_PASSES_MIN_SIZE

    def _blocks_in_halves(self, stored: Any) -> bool:
        shape = tensor_shape(stored)
        return (
            shape[-1] % 2 == 0
            and typed_sharding(stored.codes) is None
            and spreads(shape, _scale_shape(stored))
        )

    def _blocks_load_half(self, stored: Any, parity: int, signed: bool) -> jax.Array:
        scales = element_scales(jnp.asarray(stored.absmax), tensor_shape(stored))
        return decode_four_bit(nibbles(stored.codes, parity), signed) * scales[..., parity::2]

    def _blocks_store_halves(
        self, halves: tuple[jax.Array, jax.Array], stored: Any, absmax: Any, signed: bool
    ) -> Any:
        scales = element_scales(absmax, tensor_shape(stored))

        def codes(parity: int) -> jax.Array:
            half = scales[..., parity::2]
            value = halves[parity].astype(jnp.float32)
            return encode_four_bit(value / jnp.where(half > 0, half, 1.0), signed)

        return self._blocks_stored(paired(codes(0), codes(1)), absmax, stored)

    def _blocks_scales(self, value: Callable[[], jax.Array], stored: Any) -> jax.Array:
        return block_absmax(value(), _scale_shape(stored))

    def _blocks_scaled(self, value: jax.Array, stored: Any, absmax: Any, signed: bool) -> Any:
        return self._blocks_stored(
            pack(encoded_by(value, absmax, functools.partial(encode_four_bit, signed=signed))),
            absmax,
            stored,
        )

    @staticmethod
    def _blocks_stored(codes: jax.Array, absmax: jax.Array, stored: Any) -> Any:
        if _odd_marker(stored.absmax, stored.codes):
            absmax = absmax[..., None]
        return same_container(
            stored,
            PackedQuantizedArray(
                codes=place_like(codes, stored.codes), absmax=place_like(absmax, stored.absmax)
            ),
        )


@dataclasses.dataclass(frozen=True)
class FourBitBlockwise(_FourBitStorage):
    """First-moment storage in 4 bits: the paper's B128/DE (Li, Chen and Zhu, 2023).

    Leaves with at least ``min_size`` elements are stored as a :class:`PackedQuantizedArray`:
    codes of the signed dynamic-exponent map (:func:`create_four_bit_map`), two per byte, and
    one float32 absmax per block of at most ``block_size`` elements (the tiles of
    :class:`BlockwiseQuantized`: runs of a row, or whole short rows; the authors' blocks are
    runs of the flattened tensor, the same when rows are a multiple of the block size).
    Smaller leaves, scalars and complex leaves stay float32 (complex64). Costs
    ``0.5 + 4 / block_size`` bytes per element. Codes are nearest entries, ties to the lower.

    Args:
      block_size: the most elements that share one scale (128 in the paper), >= 1.
      min_size: leaves with fewer elements stay float32, >= 0 (the authors quantize tensors of
        more than 4096 elements, and only those of two or more axes).

    Raises:
      ValueError: in ``init``, for a param that is not a float (integer leaves have no
        moments to store).

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> from adam_jax.quantization import FourBitBlockwise
      >>> state = adam_jax.scale_by_adam(mu_dtype=FourBitBlockwise()).init(jnp.zeros((64, 256)))
      >>> print(state.mu.codes.shape, state.mu.codes.dtype, state.mu.absmax.shape)
      (64, 128) uint8 (64, 2)
    """

    def init(self, param: Any) -> Any:
        if not self.quantizes(param):
            return self._plain(param)
        return self._blocks_init(param, signed=True)

    def load(self, stored: Any) -> jax.Array:
        return self._blocks_load(stored, signed=True) if is_quantized(stored) else stored

    def store(self, value: jax.Array, stored: Any) -> Any:
        if not is_quantized(stored):
            return value.astype(stored.dtype)
        return self._blocks_store(value, stored, signed=True)

    def store_scales(self, value: Callable[[], jax.Array], stored: Any) -> jax.Array:
        return self._blocks_scales(value, stored)

    def store_scaled(self, value: jax.Array, stored: Any, scales: Any) -> Any:
        return self._blocks_scaled(value, stored, scales, signed=True)

    def in_halves(self, stored: Any) -> bool:
        return is_quantized(stored) and self._blocks_in_halves(stored)

    def load_half(self, stored: Any, parity: int) -> jax.Array:
        return self._blocks_load_half(stored, parity, signed=True)

    def store_halves(self, even: jax.Array, odd: jax.Array, stored: Any, scales: Any) -> Any:
        return self._blocks_store_halves((even, odd), stored, scales, signed=True)


@dataclasses.dataclass(frozen=True)
class FourBitRank1(_FourBitStorage):
    """Second-moment storage in 4 bits: rank-1 normalization and the linear map without zero
    (Li, Chen and Zhu, 2023).

    Leaves of two or more axes with at least ``min_size`` elements are stored as a
    :class:`Rank1QuantizedArray`: each element divided by the smaller of its row's maximum (over
    the last axis) and its column's (over all other axes), rounded to the nearest of
    ``1/16, 2/16, ..., 1``, two codes per byte. The authors' code takes one maximum per axis
    for tensors of more than two axes; here those tensors are the matrix of their last axis
    against the others (convolution kernels: one maximum per output channel and one per input
    position), which normalizes each element by a value at most as large. Vectors with at least
    ``min_size`` elements take blocks of ``block_size`` with the same linear map (as the
    authors' code does for them). Smaller leaves and scalars stay float32. No element decodes
    to zero unless its row or column is all zeros, so ``1 / (sqrt(v) + eps)`` never jumps to
    ``1 / eps`` for a parameter whose neighbours have gradients (the paper's zero-point
    problem). torchao's 4-bit AdamW quantizes this moment block-wise with the same map instead.
    On :class:`adam_jax.FlatParams` each packed tensor is stored as on the tree
    (:attr:`~adam_jax.MomentStorage.per_tensor`).

    Args:
      block_size: the most elements that share one scale in a vector, >= 1.
      min_size: leaves with fewer elements stay float32, >= 0.

    Raises:
      ValueError: in ``init``, for a param that is not a float.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> from adam_jax.quantization import FourBitRank1
      >>> state = adam_jax.scale_by_adam(nu_dtype=FourBitRank1()).init(jnp.zeros((64, 256)))
      >>> nu = state.nu
      >>> print(nu.codes.shape, nu.row_max.shape, nu.col_max.shape)
      (64, 128) (64, 1) (1, 256)
    """

    # Its rows and columns are a tensor's: FlatParams buffers keep it per packed tensor.
    per_tensor = True

    def init(self, param: Any) -> Any:
        if not self.quantizes(param):
            return self._plain(param)
        if len(param.shape) == 1:
            return self._blocks_init(param, signed=False)
        shape = tuple(param.shape)
        placement = placement_of(param)
        packed = packed_shape(shape)
        rows, cols = shape[:-1] + (1,), (1,) * (len(shape) - 1) + shape[-1:]
        return Rank1QuantizedArray(
            codes=jax.lax.full(
                packed, 0, jnp.uint8, sharding=placement_for_shape(placement, packed)
            ),
            row_max=jax.lax.full(
                rows, 0, jnp.float32, sharding=placement_for_shape(placement, rows)
            ),
            col_max=jax.lax.full(
                cols, 0, jnp.float32, sharding=placement_for_shape(placement, cols)
            ),
        )

    def load(self, stored: Any) -> jax.Array:
        if not is_quantized(stored):
            return stored
        if not hasattr(stored, "row_max"):
            return self._blocks_load(stored, signed=False)
        return dequantize_rank1(
            jnp.asarray(stored.codes), jnp.asarray(stored.row_max), jnp.asarray(stored.col_max)
        )

    def store(self, value: jax.Array, stored: Any) -> Any:
        if not is_quantized(stored):
            return value.astype(stored.dtype)
        if not hasattr(stored, "row_max"):
            return self._blocks_store(value, stored, signed=False)
        codes, row_max, col_max = quantize_rank1(value)
        return self._rank1_stored(codes, row_max, col_max, stored)

    def store_scales(self, value: Callable[[], jax.Array], stored: Any) -> Any:
        if not hasattr(stored, "row_max"):
            return self._blocks_scales(value, stored)
        x = value()
        runs = scale_shape_for(tuple(x.shape), self.block_size, placement_of(x))
        if runs[:-1] != x.shape[:-1]:  # blocks of several rows
            return rank1_maxima(lambda: x)
        # The maxima of each row's runs, the reduction of the first moment's blocks
        # (FourBitBlockwise of the same block_size), so that one kernel computes both; the
        # rows' maxima are taken from them in the second pass.
        return block_absmax(x, runs), column_maxima_by_runs(value())

    def store_scaled(self, value: jax.Array, stored: Any, scales: Any) -> Any:
        if not hasattr(stored, "row_max"):
            return self._blocks_scaled(value, stored, scales, signed=False)
        row_max, col_max = scales
        row_max = jnp.max(row_max, axis=-1, keepdims=True)  # over the runs' maxima, if any
        codes = pack(encode_four_bit(rank1_scaled(value, row_max, col_max), signed=False))
        return self._rank1_stored(codes, row_max, col_max, stored)

    def in_halves(self, stored: Any) -> bool:
        if not is_quantized(stored):
            return False
        if not hasattr(stored, "row_max"):
            return self._blocks_in_halves(stored)
        return tensor_shape(stored)[-1] % 2 == 0 and typed_sharding(stored.codes) is None

    def load_half(self, stored: Any, parity: int) -> jax.Array:
        if not hasattr(stored, "row_max"):
            return self._blocks_load_half(stored, parity, signed=False)
        col_max = jnp.asarray(stored.col_max).astype(jnp.float32)[..., parity::2]
        scale = jnp.minimum(jnp.asarray(stored.row_max).astype(jnp.float32), col_max)
        return decode_four_bit(nibbles(stored.codes, parity), signed=False) * scale

    def store_halves(self, even: jax.Array, odd: jax.Array, stored: Any, scales: Any) -> Any:
        if not hasattr(stored, "row_max"):
            return self._blocks_store_halves((even, odd), stored, scales, signed=False)
        row_max, col_max = scales
        row_max = jnp.max(row_max, axis=-1, keepdims=True)  # over the runs' maxima, if any

        def codes(half: jax.Array, parity: int) -> jax.Array:
            scaled = rank1_scaled(half, row_max, col_max[..., parity::2])
            return encode_four_bit(scaled, signed=False)

        return self._rank1_stored(paired(codes(even, 0), codes(odd, 1)), row_max, col_max, stored)

    @staticmethod
    def _rank1_stored(codes: jax.Array, row_max: jax.Array, col_max: jax.Array, stored: Any) -> Any:
        return same_container(
            stored,
            Rank1QuantizedArray(
                codes=place_like(codes, stored.codes),
                row_max=place_like(row_max, stored.row_max),
                col_max=place_like(col_max, stored.col_max),
            ),
        )


def four_bit_moments(
    block_size: int = 128, min_size: int = 4096
) -> dict[str, FourBitBlockwise | FourBitRank1]:
    """``{"mu_dtype": FourBitBlockwise, "nu_dtype": FourBitRank1}`` to splat into an alias:
    4-bit moments as in Li, Chen and Zhu (NeurIPS 2023), about 1.07 bytes per parameter for
    both moments of a large matrix instead of 8.

    Args:
      block_size: the most elements that share one scale of the first moment (and of the
        second moment of a vector), >= 1.
      min_size: leaves with fewer elements keep float32 moments, >= 0.

    Returns:
      The two storages, keyed by the aliases' argument names.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.adamw(1e-3, weight_decay=0.01, **adam_jax.four_bit_moments())
      >>> state = tx.init(jnp.zeros((128, 512)))
      >>> print(adam_jax.state_bytes(state[0]) / (128 * 512))  # codes, scales, maxima, count
      1.07037353515625
    """
    return {
        "mu_dtype": FourBitBlockwise(block_size, min_size),
        "nu_dtype": FourBitRank1(block_size, min_size),
    }
