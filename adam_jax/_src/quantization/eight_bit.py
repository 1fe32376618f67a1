"""8-bit moment storage: :class:`BlockwiseQuantized`, the :class:`MomentStorage` that keeps a
moment as 8-bit codes of the dynamic map with one scale per block, and
:func:`eight_bit_moments`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax._src.quantization.blocks import (
    TWO_PASSES_MIN_SIZE,
    QuantizedArray,
    block_absmax,
    dequantize_blockwise,
    encoded_by,
    is_quantized,
    quantize,
    scale_shape_for,
    scale_sharding_for,
)
from adam_jax._src.quantization.dynamic_map import encode, map_constants
from adam_jax._src.quantization.fused import check_kernel_mode
from adam_jax._src.storage import MomentStorage, same_container
from adam_jax._src.typed_sharding import place_like, placement_of


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
      kernel: how Adam steps a leaf whose two moments are both stored so: ``"xla"`` (the
        XLA operations, the default), ``"auto"`` (the fused Pallas kernel, one pass per leaf,
        on a CUDA GPU; the XLA operations elsewhere), ``"pallas"`` (the kernel; an error where
        it cannot run) or ``"interpret"`` (the kernel in Pallas' interpret mode, any backend).
        The kernel covers Adam and AdamW with float32 gradients and blocks of a power-of-two
        length that follow one another in the leaf; other leaves take the XLA operations
        (``adam_jax._src.quantization.fused``).

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> from adam_jax.quantization import BlockwiseQuantized
      >>> tx = adam_jax.scale_by_adam(mu_dtype=BlockwiseQuantized(signed=True),
      ...                             nu_dtype=BlockwiseQuantized(signed=False))
      >>> state = tx.init(jnp.zeros((16, 512)))
      >>> print(state.mu.codes.shape, state.mu.absmax.shape)
      (16, 512) (16, 2)
    """

    block_size: int = 256
    min_size: int = 4096
    signed: bool = True
    kernel: str = "xla"
    # Blocks tile whole rows (the last two axes of a matrix), so a slice of whole blocks' rows
    # is stored as that slice of the codes and the scales.
    row_slices = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size}")
        if self.min_size < 0:
            raise ValueError(f"min_size must be an integer >= 0, got {self.min_size}")
        check_kernel_mode(self.kernel)

    def quantizes(self, param: Any) -> bool:
        """Whether a leaf like ``param`` is stored quantized (else float32)."""
        complex_ = jnp.issubdtype(param.dtype, jnp.complexfloating)
        return len(param.shape) > 0 and _size(param) >= self.min_size and not complex_

    def init(self, param: Any) -> Any:
        shape = tuple(param.shape)
        placement = placement_of(param)
        if not self.quantizes(param):
            complex_ = jnp.issubdtype(param.dtype, jnp.complexfloating)
            dtype = jnp.complex64 if complex_ else jnp.float32
            return jax.lax.full(shape, 0, dtype, sharding=placement)
        scale_shape = scale_shape_for(shape, self.block_size, placement)
        zero_code = map_constants(self.signed).zero_code
        scale_sharding = scale_sharding_for(placement, shape, scale_shape)
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
        codes, absmax = quantize(value, tuple(stored.absmax.shape), self.signed)
        return self._stored(codes, absmax, stored)

    def in_two_passes(self, stored: Any) -> bool:
        # Below this size the second pass's launch costs more than the bytes it saves.
        return is_quantized(stored) and _size(stored.codes) >= TWO_PASSES_MIN_SIZE

    def store_scales(self, value: Callable[[], jax.Array], stored: Any) -> jax.Array:
        return block_absmax(value(), tuple(stored.absmax.shape))

    def store_scaled(self, value: jax.Array, stored: Any, scales: Any) -> Any:
        codes = encoded_by(value, scales, functools.partial(encode, signed=self.signed))
        return self._stored(codes, scales, stored)

    @staticmethod
    def _stored(codes: jax.Array, absmax: jax.Array, stored: Any) -> Any:
        quantized = QuantizedArray(
            codes=place_like(codes.astype(jnp.uint8), stored.codes),
            absmax=place_like(absmax.astype(jnp.float32), stored.absmax),
        )
        return same_container(stored, quantized)


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
