"""What a batch goes through before the model sees it: random shifts (training only) and
standardization."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize(images: jax.Array, mean: float, std: float) -> jax.Array:
    """Pixel values in [0, 255], ``(b, 28, 28)`` -> standardized float32 ``(b, 28, 28, 1)``."""
    return ((images.astype(jnp.float32) / 255.0 - mean) / std)[..., None]


def random_shift(key: jax.Array, images: jax.Array, max_shift: int) -> jax.Array:
    """Shifts each image by up to ``max_shift`` pixels along each axis, filling with zeros.

    The shift is a product with one-hot matrices, ``rows @ padded @ cols.T``: on CPU, batched
    small matmuls are several times faster than a per-image ``dynamic_slice`` gather.
    """
    if max_shift == 0:
        return images
    height, width = images.shape[1:]
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    offsets = jax.random.randint(key, (images.shape[0], 2, 1, 1), 0, 2 * max_shift + 1)

    def one_hot(size: int, offset: jax.Array) -> jax.Array:
        # (batch, size, size + 2 * max_shift): row i selects padded index i + offset.
        target = jnp.arange(size)[None, :, None] + offset
        return (target == jnp.arange(size + 2 * max_shift)[None, None, :]).astype(images.dtype)

    rows, cols = one_hot(height, offsets[:, 0]), one_hot(width, offsets[:, 1])
    return jnp.einsum("bij,bjk,blk->bil", rows, padded, cols)
