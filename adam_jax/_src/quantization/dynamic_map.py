"""The number format of 8-bit moments: the dynamic quantization map and its elementwise codec.

:func:`create_dynamic_map` builds the 256 entries of Dettmers et al.'s map, :func:`encode` and
:func:`decode` convert between values in ``[-1, 1]`` and their ``uint8`` codes by the map's
closed form, with no table lookup or search.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


class MapConstants(NamedTuple):
    fraction_bits: int
    top_rank: int  # rank of the entry 1 among the entries >= 0
    zero_code: int
    top_midpoint: float  # float32 midpoint between 1 and the entry below it
    reciprocal_high: tuple[float, ...]  # 1 / (5**k * 2**(8 + f)) for k = 0..7, 10 leading bits
    reciprocal_low: tuple[float, ...]  # the rest, rounded to float32


@functools.cache
def map_constants(signed: bool) -> MapConstants:
    qmap = create_dynamic_map(signed)
    zero_code = int(np.flatnonzero(qmap == 0.0)[0])
    top_midpoint = float((qmap[-2] + np.float32(1.0)) * np.float32(0.5))
    f = 0 if signed else 1
    exact = 1.0 / (5.0 ** np.arange(8) * 2.0 ** (8 + f))
    mantissa, exponent = np.frexp(exact)
    high = np.ldexp(np.floor(mantissa * 2**10) / 2**10, exponent)
    low = (exact - high).astype(np.float32)
    return MapConstants(
        f, 255 - zero_code, zero_code, top_midpoint, tuple(map(float, high)), tuple(map(float, low))
    )


def _entry_magnitude(rank: jax.Array, signed: bool) -> jax.Array:
    """The map's entry of ``rank`` among its entries >= 0 (float32, see the formula above)."""
    constants = map_constants(signed)
    f = constants.fraction_bits
    u = jnp.maximum(rank + (2**f - 1), 1).astype(jnp.float32)
    # u's leading power of two m = 2**e and the reciprocal of its decade's denominator (the
    # power of 5 is 7 - i = 7 + f - e), by comparisons rather than from u's exponent bits: a
    # bitcast is what XLA:GPU compiled wrong in encode (jax 0.11.2, an H200). Rank 0 (u = 1
    # unsigned) takes any reciprocal: its entry is 0.
    leading = jnp.ones_like(u)
    high = jnp.full_like(u, constants.reciprocal_high[min(7 + f, 7)])
    low = jnp.full_like(u, constants.reciprocal_low[min(7 + f, 7)])
    for e in range(1, 8 + f):
        at_least = u >= float(2**e)
        leading = jnp.where(at_least, float(2**e), leading)
        high = jnp.where(at_least, constants.reciprocal_high[7 + f - e], high)
        low = jnp.where(at_least, constants.reciprocal_low[7 + f - e], low)
    numerator = 18.0 * u + 9.0 - 16.0 * leading  # 2m + 18j + 9 with j = u - m
    # numerator * high is exact (numerators have at most 14 bits), so the sum rounds once: to
    # the correctly rounded quotient, for every entry of both maps (checked in the tests), with
    # or without an FMA contraction.
    magnitude = numerator * high + numerator * low
    return jnp.where(rank == 0, 0.0, jnp.where(rank == constants.top_rank, 1.0, magnitude))


def decode(codes: jax.Array, signed: bool) -> jax.Array:
    """The map's entries at ``codes`` (float32), without indexing the map."""
    code = codes.astype(jnp.int32)
    if not signed:
        return _entry_magnitude(code, signed)
    zero = map_constants(signed).zero_code
    magnitude = _entry_magnitude(jnp.abs(code - zero), signed)
    return jnp.where(code < zero, -magnitude, magnitude)


def encode(normalized: jax.Array, signed: bool) -> jax.Array:
    """Index of the nearest map entry to ``normalized`` (float32 in [-1, 1]), as uint8.

    Equal to the number of the map's float32 midpoints below ``normalized`` (ties to the lower
    entry), computed elementwise without a search or a table.
    """
    constants = map_constants(signed)
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
    # code is an exact integer in [0, 255]: converted (through int32, the form run on the GPU
    # below), not read from the mantissa bits of code + 2**23. XLA:GPU (jax 0.11.2, an H200)
    # miscompiled that bitcast in some fusions: every signed code 255. The same on a CPU, bit
    # for bit, and as fast.
    return code.astype(jnp.int32).astype(jnp.uint8)
