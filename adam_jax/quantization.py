"""8-bit block-wise quantized moment storage (Dettmers et al., 2022).

Adam keeps two moments per parameter. Stored in float32 they cost 8 bytes per parameter; this
module stores each moment in one byte plus one float32 scale per block of ``block_size``
elements, i.e. ``1 + 4 / block_size`` bytes (``~1.016`` bytes for blocks of 256, ``~2.03`` bytes
per parameter for both moments).

Block-wise quantization (Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via
Block-wise Quantization", ICLR 2022). A tensor ``x`` is flattened, padded to whole blocks of
``B`` elements and, for every block ``b``::

    a_b     = max_{i in b} |x_i|                          (one float32 "absmax" per block)
    code_i  = argmin_j | x_i / a_b - Q_j |                (nearest entry of the map, uint8)
    x~_i    = a_b * Q[code_i]                              (dequantization)

``Q`` is the *dynamic* quantization map of the paper: 256 sorted values in ``[-1, 1]`` laid out
like a floating point format whose exponent is the number of leading zero bits, so relative
precision is roughly constant over seven decades (``1e-7 .. 1``). The signed map (first
moment) spends one bit on the sign; the unsigned map (second moment, which is never negative)
spends it on an extra fraction bit. Both contain ``0`` and ``1`` exactly, so zeros and the
block maximum are reproduced exactly, and rounding to the nearest map entry never flips a sign.

Because every block has its own scale, an outlier only costs precision inside its own block.
Per element the error is bounded by ``a_b * max_gap(Q) / 2`` where ``max_gap`` is the largest
distance between neighbouring entries of ``Q`` (also counting ``-1`` and ``1`` as ends);
:func:`max_quantization_error` returns that bound.

Tensors with fewer than ``min_size`` elements (default 4096: biases, norms) are kept in float32
as in the paper, they cost nothing at scale and are the most sensitive ones.

Example::

  import adam_jax
  from adam_jax import quantization

  opt = adam_jax.adam(1e-3, **quantization.eight_bit_moments())
  # or explicitly
  opt = adam_jax.adam(
      1e-3,
      mu_dtype=quantization.BlockwiseQuantized(signed=True),
      nu_dtype=quantization.BlockwiseQuantized(signed=False),
  )
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax.storage import MomentStorage

__all__ = [
    "BlockwiseQuantized",
    "QuantizedArray",
    "create_dynamic_map",
    "dequantize_blockwise",
    "eight_bit_moments",
    "is_quantized",
    "max_quantization_error",
    "moment_sharding",
    "quantize_blockwise",
    "state_bytes",
]


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
    """
    return _dynamic_map_np(bool(signed))


def max_quantization_error(signed: bool = True) -> float:
    """Half the largest gap of the map (ends ``-1``/``0`` and ``1`` included).

    For every element ``|x - dequantize(quantize(x))| <= absmax_of_its_block * this``
    (up to float32 rounding of ``x / absmax``).
    """
    q = create_dynamic_map(signed).astype(np.float64)
    lo = -1.0 if signed else 0.0
    pts = np.unique(np.concatenate([[lo], q, [1.0]]))
    return float(np.max(np.diff(pts)) / 2.0)


# --------------------------------------------------------------------------------------------
# Block-wise quantization of one array.
# --------------------------------------------------------------------------------------------


class QuantizedArray(NamedTuple):
    """Stored form of one quantized tensor.

    Attributes:
      codes: ``uint8`` array with the shape of the original tensor (index into the map).
      absmax: ``float32[ceil(size / block_size)]``, the scale of every block.

    As a tree of shardings (:func:`moment_sharding`) its fields are those arrays' shardings.
    """

    codes: Any
    absmax: Any


def _num_blocks(size: int, block_size: int) -> int:
    return max(1, math.ceil(size / block_size))


def _to_blocks(x: jax.Array, block_size: int) -> jax.Array:
    flat = x.reshape(-1)
    n_blocks = _num_blocks(flat.size, block_size)
    pad = n_blocks * block_size - flat.size
    if pad:
        flat = jnp.pad(flat, (0, pad))
    return flat.reshape(n_blocks, block_size)


_TABLE_SHIFT = 15  # buckets of the float32 bit pattern: sign, exponent, 8 mantissa bits


@functools.cache
def _encode_tables(signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables for :func:`_encode`.

    ``thresholds[k]`` is the midpoint between map entries ``k`` and ``k + 1`` (with a final
    ``+inf``), so the nearest entry to ``x`` is the number of thresholds below ``x``. ``bucket``
    holds that number for the lowest value of every bucket of float32 bit patterns sharing their
    top 17 bits (relative width 2**-8). The map's entries are at least 0.7% apart relative to
    their magnitude, so no bucket contains two thresholds, and one comparison with the next
    threshold finishes the search (checked here for every bucket of [-1, 1]).
    """
    q = create_dynamic_map(signed).astype(np.float64)
    thresholds = ((q[:-1] + q[1:]) / 2.0).astype(np.float32)
    b = np.arange(2 ** (32 - _TABLE_SHIFT), dtype=np.uint64)
    low_bits = (1 << _TABLE_SHIFT) - 1
    first = (b << _TABLE_SHIFT).astype(np.uint32).view(np.float32)
    last = ((b << _TABLE_SHIFT) | low_bits).astype(np.uint32).view(np.float32)
    negative = (b >> (31 - _TABLE_SHIFT)) & 1 == 1
    lo, hi = np.where(negative, last, first), np.where(negative, first, last)
    with np.errstate(invalid="ignore"):
        code_lo = np.searchsorted(thresholds, lo, side="left")
        code_hi = np.searchsorted(thresholds, hi, side="left")
    in_range = np.isfinite(lo) & np.isfinite(hi) & (np.abs(lo) <= 1.0) & (np.abs(hi) <= 1.0)
    if (code_hi - code_lo)[in_range].max() > 1:  # pragma: no cover - a property of the map
        raise AssertionError("quantization map too dense for the bucket table")
    bucket = np.minimum(code_lo, 254).astype(np.uint8)
    thresholds = np.concatenate([thresholds, [np.inf]]).astype(np.float32)
    bucket.setflags(write=False)
    thresholds.setflags(write=False)
    return bucket, thresholds


def _encode(normalized: jax.Array, signed: bool) -> jax.Array:
    """Index of the nearest map entry to ``normalized`` (float32 in [-1, 1]).

    Two table lookups and one comparison per element (see :func:`_encode_tables`), fused by
    XLA into the surrounding elementwise loop; equal to a binary search over the 255 midpoints
    (ties round up), without a search over the map.
    """
    bucket, thresholds = _encode_tables(bool(signed))
    bits = jax.lax.bitcast_convert_type(normalized.astype(jnp.float32), jnp.uint32)
    code = jnp.asarray(bucket)[bits >> _TABLE_SHIFT].astype(jnp.int32)
    code = code + (normalized > jnp.asarray(thresholds)[code]).astype(jnp.int32)
    return code.astype(jnp.uint8)


def quantize_blockwise(
    x: jax.Array, *, block_size: int = 256, signed: bool = True
) -> QuantizedArray:
    """Quantizes ``x`` block-wise to 8 bits with the dynamic map.

    Args:
      x: a real array (any float dtype, any shape). For ``signed=False`` it must be >= 0.
      block_size: number of consecutive (row-major) elements that share one scale.
      signed: which map to use, see :func:`create_dynamic_map`.

    Returns:
      A :class:`QuantizedArray` with ``codes.shape == x.shape``.
    """
    x = jnp.asarray(x)
    if jnp.iscomplexobj(x):
        raise TypeError("quantize_blockwise supports real arrays only")
    blocks = _to_blocks(x.astype(jnp.float32), block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    normalized = blocks / safe[:, None]
    codes = _encode(normalized, signed).reshape(-1)[: x.size].reshape(x.shape)
    return QuantizedArray(codes=codes, absmax=absmax)


def dequantize_blockwise(
    q: QuantizedArray, *, block_size: int = 256, signed: bool = True, dtype: Any = jnp.float32
) -> jax.Array:
    """Inverse of :func:`quantize_blockwise`: ``absmax[block] * map[code]``."""
    codes = q.codes
    qmap = jnp.asarray(create_dynamic_map(signed))
    values = _to_blocks(qmap[codes.astype(jnp.int32)], block_size) * q.absmax[:, None]
    return values.reshape(-1)[: codes.size].reshape(codes.shape).astype(dtype)


# --------------------------------------------------------------------------------------------
# MomentStorage implementation.
# --------------------------------------------------------------------------------------------


def _size(param: Any) -> int:
    return int(np.prod(param.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class BlockwiseQuantized(MomentStorage):
    """Moment storage in 8-bit block-wise dynamic quantization.

    Leaves with at least ``min_size`` elements are stored as :class:`QuantizedArray`
    (``uint8`` codes with the parameter's shape + one float32 absmax per block); smaller leaves,
    and complex ones, are stored as plain float32 (complex64 for complex). Arithmetic always
    happens in float32: ``load`` dequantizes, the optimizer updates the moment, ``store``
    re-quantizes, all fused by XLA in the jitted step.

    ``store`` keeps the dtypes it finds in the stored form: a state whose codes and scales were
    mapped to another dtype (for example by ``optax.tree_map_params`` with a cast) still decodes
    to the same moments, and the next update keeps that dtype.

    Args:
      block_size: elements per block (256 in the paper), >= 1.
      min_size: tensors with fewer elements stay unquantized (4096 in the paper), >= 0.
      signed: ``True`` for the first moment (values of both signs), ``False`` for the second
        moment (non-negative; one more bit of precision).

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> from adam_jax.quantization import BlockwiseQuantized
      >>> tx = adam_jax.scale_by_adam(mu_dtype=BlockwiseQuantized(signed=True),
      ...                             nu_dtype=BlockwiseQuantized(signed=False))
      >>> state = tx.init(jnp.zeros(8192))
      >>> print(state.mu.codes.shape, state.mu.absmax.shape)
      (8192,) (32,)
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
        return _size(param) >= self.min_size and not complex_

    def init(self, param: Any) -> Any:
        shape = tuple(param.shape)
        if not self.quantizes(param):
            if jnp.issubdtype(param.dtype, jnp.complexfloating):
                return jnp.zeros(shape, jnp.complex64)
            return jnp.zeros(shape, jnp.float32)
        return QuantizedArray(
            codes=jnp.full(shape, self._zero_code, jnp.uint8),
            absmax=jnp.zeros((_num_blocks(_size(param), self.block_size),), jnp.float32),
        )

    @property
    def _zero_code(self) -> int:
        return int(np.flatnonzero(create_dynamic_map(self.signed) == 0.0)[0])

    def load(self, stored: Any) -> jax.Array:
        if is_quantized(stored):
            quantized = QuantizedArray(codes=stored.codes, absmax=stored.absmax)
            return dequantize_blockwise(quantized, block_size=self.block_size, signed=self.signed)
        return stored

    def store(self, value: jax.Array, stored: Any) -> Any:
        if not is_quantized(stored):
            return value.astype(stored.dtype)
        quantized = quantize_blockwise(value, block_size=self.block_size, signed=self.signed)
        quantized = QuantizedArray(
            codes=quantized.codes.astype(stored.codes.dtype),
            absmax=quantized.absmax.astype(stored.absmax.dtype),
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

    Codes have the param's shape and take its sharding; the block scales are a small 1-D array
    and are replicated over the param's mesh. Derive the shardings of a whole state with
    ``optax.tree_map_params``::

      state_shardings = optax.tree_map_params(
          tx, quantization.moment_sharding, state, param_shardings,
          is_leaf=quantization.is_quantized,
          transform_non_params=lambda _: replicated,  # the step counts
      )

    Args:
      stored: a stored moment leaf (a :class:`QuantizedArray` or a plain array).
      param_sharding: the ``jax.sharding.NamedSharding`` of the corresponding param.

    Returns:
      ``param_sharding`` for a plain moment, or a :class:`QuantizedArray` of shardings.

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> from adam_jax import quantization
      >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
      >>> stored = quantization.BlockwiseQuantized().init(np.zeros((64, 128)))
      >>> sharding = quantization.moment_sharding(stored, NamedSharding(mesh, P("x")))
      >>> print(sharding.codes.spec == P("x"), sharding.absmax.spec == P())
      True True
    """
    if not is_quantized(stored):
        return param_sharding
    replicated = jax.sharding.NamedSharding(param_sharding.mesh, jax.sharding.PartitionSpec())
    return QuantizedArray(codes=param_sharding, absmax=replicated)


def eight_bit_moments(block_size: int = 256, min_size: int = 4096) -> dict[str, BlockwiseQuantized]:
    """``{"mu_dtype": signed storage, "nu_dtype": unsigned storage}`` to splat into an alias.

    Args:
      block_size: elements that share one scale, >= 1.
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
