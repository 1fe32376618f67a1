"""Block means: a moment kept as one value per block of its param (Adam-mini's second moment)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from adam_jax._src.numerics import compute_dtype
from adam_jax._src.storage import MomentStorage
from adam_jax._src.typed_sharding import place_like, placement_for_shape, placement_of


@dataclasses.dataclass(frozen=True)
class BlockMeanStorage(MomentStorage):
    r"""Keeps a moment as its mean over each block of the param: one value per block.

    The param's axes are cut into contiguous blocks of ``block_shape`` (each entry divides the
    param's dimension); the stored array has one entry per block, of shape
    ``param.shape / block_shape``. A Dense kernel ``(in, out)`` with blocks ``(in, 1)`` keeps
    one value per output neuron, an embedding ``(vocab, d)`` with ``(1, d)`` one per token, a
    query kernel ``(d, heads * head_dim)`` with ``(d, head_dim)`` one per head, and blocks of
    the param's own shape one value per tensor. A reducing storage: the rule's step uses the
    block mean of the new moment (:meth:`adam_jax.rules.Leaf.settle`), which is Adam-mini's update
    (Zhang et al., 2025) when the moment is Adam's second moment. On
    :class:`adam_jax.FlatParams` the core applies it to each packed tensor in its shape.

    Attributes:
      block_shape: the extent of a block along each axis of the param.
      dtype: the stored dtype (``None``: the param's, at least float32; the means are few).
    """

    block_shape: tuple[int, ...]
    dtype: Any = None

    reduces = True

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the means of a param of ``shape``; ValueError unless the blocks fit."""
        if len(shape) != len(self.block_shape) or any(
            b < 1 or n % b for n, b in zip(shape, self.block_shape, strict=False)
        ):
            raise ValueError(
                f"blocks of shape {self.block_shape} do not divide a param of shape {shape}: "
                "each block extent must be >= 1 and divide its dimension"
            )
        return tuple(n // b for n, b in zip(shape, self.block_shape, strict=True))

    def init(self, param: Any) -> jax.Array:
        shape = self.stored_shape(tuple(param.shape))
        dtype = compute_dtype(param.dtype) if self.dtype is None else self.dtype
        placement = placement_for_shape(placement_of(param), shape)
        return jax.lax.full(shape, 0, dtype, sharding=placement)

    def load(self, stored: jax.Array) -> jax.Array:
        # Whole-axis blocks stay of extent 1 and broadcast; the others repeat their mean.
        expanded = stored
        for axis, (count, extent) in enumerate(zip(stored.shape, self.block_shape, strict=True)):
            if count > 1 and extent > 1:
                expanded = jnp.repeat(expanded, extent, axis=axis)
        return expanded

    def project(self, value: jax.Array, stored: jax.Array) -> jax.Array:
        return self.load(self._means(value, stored.shape))

    def store(self, value: jax.Array, stored: jax.Array) -> jax.Array:
        return place_like(self._means(value, stored.shape).astype(stored.dtype), stored)

    def _means(self, value: jax.Array, stored_shape: tuple[int, ...]) -> jax.Array:
        """The block means of ``value``: a full moment, or one that broadcasts to it (a rule's
        step may combine settled means, as AMSGrad's running maximum does)."""
        shape = tuple(k * b for k, b in zip(stored_shape, self.block_shape, strict=True))
        split: list[int] = []
        for k, b in zip(stored_shape, self.block_shape, strict=True):
            split += [k, b]
        full = value if value.shape == shape else jnp.broadcast_to(value, shape)
        blocks = full.reshape(split)
        return jnp.mean(blocks, axis=tuple(range(1, 2 * len(shape), 2)))


def block_means(block_shape: tuple[int, ...], dtype: Any = None) -> BlockMeanStorage:
    """A :class:`BlockMeanStorage`: one value per block of ``block_shape`` of a leaf.

    For one leaf; a tree of them, one per leaf, comes from :func:`adam_jax.per_leaf` (as
    :func:`adam_jax.adam_mini_partition` builds).

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> per_neuron = adam_jax.block_means((4, 1))  # a (4, 3) kernel: one value per output
      >>> tx = adam_jax.adam(1e-3, nu_dtype=adam_jax.per_leaf(lambda p: per_neuron))
      >>> state = tx.init(jnp.zeros((4, 3)))
      >>> _, state = tx.update(jnp.arange(12.0).reshape(4, 3), state)
      >>> print(state[0].nu.shape, state[0].nu)  # 0.001 * the mean of g^2 over each column
      (1, 3) [[0.0315 0.0415 0.0535]]
    """
    block_shape = tuple(int(b) for b in block_shape)
    if any(b < 1 for b in block_shape):
        raise ValueError(f"block extents must be >= 1, got {block_shape}")
    return BlockMeanStorage(block_shape, dtype)
