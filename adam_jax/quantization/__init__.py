"""Quantized moment storage: 8-bit block-wise (Dettmers et al., 2022) and 4-bit (Li, Chen and
Zhu, 2023).

**4-bit moments** (:func:`four_bit_moments`): the first moment in blocks of 128 with a
16-entry signed dynamic-exponent map (:class:`FourBitBlockwise`), the second with rank-1
normalization and the linear map ``1/16 .. 1`` that has no zero (:class:`FourBitRank1`), two
codes per byte; about 1.07 bytes per parameter for both moments of a large matrix. The rest of
this docstring describes the 8-bit format, whose block layout the 4-bit first moment shares.

**8-bit moments.**

Adam keeps two moments per parameter. Stored in float32 they cost 8 bytes per parameter; this
module stores each moment in one byte plus one float32 scale per block of about ``block_size``
elements, i.e. ``1 + 4 / block_size`` bytes (``~1.016`` bytes for blocks of 256, ``~2.03`` bytes
per parameter for both moments).

Block-wise quantization (Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via
Block-wise Quantization", ICLR 2022). For every block ``b`` of a tensor ``x``::

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

**Layout.** Blocks are tiles of at most ``block_size`` elements over the last two axes: runs of
``ceil(n / k)`` consecutive elements of a row of ``n``, with ``k = ceil(n / block_size)`` (the
last run padded), or, when a row fits a block twice, the largest number of whole consecutive
rows that fits and divides the number of rows (a vector: runs only). The codes keep the
tensor's shape; the scales have its rank, with those two axes divided by the tile, so the tile
is read back from the two shapes and a stored moment decodes whatever layout made it. Scales
cost ``4 / block_size`` bytes per element when rows are a multiple of ``block_size`` long or
short rows group into full blocks, up to twice that for rows a little longer than a multiple,
more for short rows whose number has no divisor near ``block_size / n`` (at worst one block per
row).

**Sharding.** Axes before the last two shard the scales as they shard the codes. When one of the
last two axes is split over *Explicit* mesh axes (``jax.make_mesh``'s default), its tiles are
the largest that divide the shard length, so every shard holds whole blocks and the scales are
split like the codes. Auto mesh axes are not part of an array's type under ``jit``, so they do
not change the layout (eager, jitted and ``jax.eval_shape`` inits agree); where shards of Auto
axes cut through blocks, the scales keep that axis whole (see :func:`moment_sharding`), and the
compiler exchanges what the blocks need.

**Codec.** The map has a closed form (see ``_entry_magnitude``), so encoding and decoding are
elementwise arithmetic, with no table lookup or search: decoding is a product of a small exact
integer with a power of five split in two float32 parts, and encoding estimates the entry from
the decade and the linear position in it, then settles the last rounding with one exact
comparison against the midpoint of two neighbouring entries. Decoding returns the map's float32
entries exactly, and the codes equal the nearest-entry search over the map's float32 midpoints
(ties to the lower entry) for every float32 input.

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

from adam_jax._src.quantization.blocks import (
    QuantizedArray,
    dequantize_blockwise,
    is_quantized,
    quantize_blockwise,
)
from adam_jax._src.quantization.dynamic_map import create_dynamic_map, max_quantization_error
from adam_jax._src.quantization.eight_bit import BlockwiseQuantized, eight_bit_moments
from adam_jax._src.quantization.four_bit import (
    FourBitBlockwise,
    FourBitRank1,
    PackedQuantizedArray,
    Rank1QuantizedArray,
    create_four_bit_map,
    four_bit_moments,
    max_four_bit_error,
)
from adam_jax._src.quantization.placement import moment_sharding

__all__ = [
    "BlockwiseQuantized",
    "FourBitBlockwise",
    "FourBitRank1",
    "PackedQuantizedArray",
    "QuantizedArray",
    "Rank1QuantizedArray",
    "create_dynamic_map",
    "create_four_bit_map",
    "dequantize_blockwise",
    "eight_bit_moments",
    "four_bit_moments",
    "is_quantized",
    "max_four_bit_error",
    "max_quantization_error",
    "moment_sharding",
    "quantize_blockwise",
]
