"""The Kronecker factors and their eigenbases: their storage in the state, one flat vector per
leaf or a stack's batches of matrices (:class:`FactorStorage`, and the packing of matrices into
it), the Björck rectification of a decoded basis (:func:`bjorck_iterations`), and the
arithmetic on them: the rotations into the eigenbasis and back, the factors' outer products,
``eigh``, and the refresh of a batch of blocks' bases (:func:`_refresh_blocks`)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from adam_jax._src.orthonormalization import at_full_precision
from adam_jax._src.variants.soap.layout import BlockGroup, SoapLayout
from adam_jax._src.variants.soap.mesh import _spread
from adam_jax._src.variants.soap.solves import DIRECT, Solves
from adam_jax.quantization import FourBitBlockwise
from adam_jax.rules import (
    MomentStorage,
    cast_storage,
    compute_dtype,
    moving_average,
    replicated_placement,
)

# The authors add 1e-30 times the identity before eigh, and to the RMS of normalize_grads.
_TINY = 1e-30


@dataclasses.dataclass(frozen=True)
class FactorStorage(MomentStorage):
    """The Kronecker factors (or their eigenbases) of each leaf, flattened into one vector,
    replicated where the param is sharded: in the compute dtype (at least float32) when
    ``storage`` is None, else in ``storage``'s form of that vector (a cast to ``bfloat16``,
    8-bit or 4-bit block-wise codes), loaded back in the compute dtype for the step.

    A stack's (:attr:`SoapLayout.stacked`) are kept as matrices instead, one batch
    ``(n, d, d)`` per dimension with a factor, keyed by :func:`dimension_key`: each block's
    factor is read where it lies. On a TPU, cut from one vector, they were re-laid out at
    every step (at GPT-2 small, SOAP's stacked step held eight such loops)."""

    layout: SoapLayout
    storage: MomentStorage | None = None

    def vector(self, param: Any) -> jax.ShapeDtypeStruct:
        """The flat vector of a leaf like ``param``, as the inner storage sees it."""
        size = self.layout.size(tuple(param.shape))
        return jax.ShapeDtypeStruct(
            (size,), compute_dtype(param.dtype), sharding=replicated_placement(param)
        )

    def matrices(self, param: Any) -> dict[str, jax.ShapeDtypeStruct]:
        """A stack's batches of matrices, by dimension, as the inner storage sees them (with
        the empty slots of :meth:`SoapLayout.placement`)."""
        shape = tuple(param.shape)
        devices, (slots,) = self.layout.placement(shape)
        (group,) = self.layout.groups(shape)
        return {
            dimension_key(i): jax.ShapeDtypeStruct(
                (devices * slots, d, d),
                compute_dtype(param.dtype),
                sharding=replicated_placement(param),
            )
            for i, d in enumerate(group.factors)
            if d is not None
        }

    def _inner(self, stored: Any) -> MomentStorage | None:
        """The storage of ``stored``: None for a leaf without factors (an empty vector)."""
        return None if isinstance(stored, jax.Array) and stored.size == 0 else self.storage

    def _init_one(self, like: jax.ShapeDtypeStruct) -> Any:
        if self.storage is not None and math.prod(like.shape) > 0:
            return self.storage.init(like)
        return jnp.zeros(like.shape, like.dtype, device=like.sharding)

    def init(self, param: Any) -> Any:
        shape = tuple(param.shape)
        if self.layout.stacked:
            stored = {key: self._init_one(like) for key, like in self.matrices(param).items()}
        else:
            stored = self._init_one(self.vector(param))
        devices, _ = self.layout.placement(shape)
        if devices == 1:  # no block_axis, or a leaf of one block
            return stored
        # Each device's part of the vector (its blocks) on it; the stored form's other leaves
        # (the 8-bit scales) likewise where they split evenly.
        axis = self.layout.block_axis
        assert axis is not None  # devices > 1
        return jax.tree.map(
            lambda x: _spread(x, axis) if x.ndim and x.shape[0] % devices == 0 else x, stored
        )

    def _load_one(self, stored: Any) -> jax.Array:
        inner = self._inner(stored)
        return stored if inner is None else inner.load(stored)

    def _store_one(self, value: jax.Array, stored: Any) -> Any:
        inner = self._inner(stored)
        return value.astype(stored.dtype) if inner is None else inner.store(value, stored)

    def load(self, stored: Any) -> Any:
        if isinstance(stored, dict):
            return {key: self._load_one(part) for key, part in stored.items()}
        return self._load_one(stored)

    def store(self, value: Any, stored: Any) -> Any:
        if isinstance(stored, dict):
            return {key: self._store_one(value[key], part) for key, part in stored.items()}
        return self._store_one(value, stored)

    def _decodes_one(self, stored: Any) -> bool:
        inner = self._inner(stored)
        return False if inner is None else inner.decodes(stored)

    def decodes(self, stored: Any) -> bool:
        if isinstance(stored, dict):
            return any(self._decodes_one(part) for part in stored.values())
        return self._decodes_one(stored)


def dimension_key(i: int) -> str:
    """The key of a stack's factors (or bases) of dimension ``i`` of its blocks."""
    return f"dim{i}"


def average_factors(old: Any, new: Any, weight: Any) -> Any:
    """:func:`moving_average` of a state's factors (a leaf's vector, or a stack's batches by
    dimension) by ``new`` in the same form, all at once, which XLA updates in place."""
    return jax.tree.map(lambda o, x: moving_average(o, x, weight) if o.size else o, old, new)


def _rectify(q: jax.Array, iterations: int) -> jax.Array:
    r"""Björck orthonormalization of a basis (or a batch ``(n, d, d)`` of them):
    ``iterations`` times :math:`Q \leftarrow Q (3I - Q^\top Q) / 2`."""
    for _ in range(iterations):
        gram = jnp.swapaxes(q, -1, -2) @ q
        q = 1.5 * q - 0.5 * (q @ gram)
    return q


def bjorck_iterations(basis_dtype: Any) -> int:
    """The Björck iterations that rectify a basis decoded from ``basis_dtype`` (see
    :func:`scale_by_soap`): none without it, three for 4-bit codes, else two."""
    if basis_dtype is None:
        return 0
    return 3 if isinstance(basis_dtype, FourBitBlockwise) else 2


def _factor_storage(value: Any) -> MomentStorage | None:
    """``factor_dtype`` or ``basis_dtype`` as the storage of the flat vector (None: as
    today, the compute dtype)."""
    if value is None:
        return None
    return value if isinstance(value, MomentStorage) else cast_storage(value)


def _pack(matrices: list[jax.Array | None], like: jax.Array) -> jax.Array:
    """The flattened concatenation of a leaf's factors (``like``, empty, where it has none)."""
    parts = [m.reshape(-1) for m in matrices if m is not None]
    return jnp.concatenate(parts) if parts else like


def _rotate_matrix(x: jax.Array, bases: list[jax.Array | None], back: bool) -> jax.Array:
    """:func:`_rotate` of a matrix as plain matrix products, :math:`L^\\top X R` into the
    eigenbasis and :math:`L X R^\\top` back: SOAP's step without blocks is 1.14x as fast so on
    XLA:CPU as with the contractions over leading dimensions that :func:`_rotate` writes for
    any rank (d = 256, side by side). Blocks keep those contractions: batched, they were 1.12x
    as fast as batched plain products."""
    left, right = bases
    if left is not None:
        x = (left if back else jnp.swapaxes(left, -1, -2)) @ x
    if right is not None:
        x = x @ (jnp.swapaxes(right, -1, -2) if back else right)
    return x


def _rotate(x: jax.Array, bases: list[jax.Array | None], back: bool) -> jax.Array:
    """``x`` (in the working shape) times each basis on its dimension: :math:`Q^\\top` into the
    eigenbasis, :math:`Q` back (the authors' ``project`` and ``project_back``)."""
    if x.ndim == 2:
        return _rotate_matrix(x, bases, back)
    for q in bases:
        if q is None:
            x = jnp.moveaxis(x, 0, -1)
        else:
            x = jnp.tensordot(x, q, axes=([0], [1 if back else 0]))
    return x


def _outer(g: jax.Array, i: int) -> jax.Array:
    """:math:`G_{(i)} G_{(i)}^\\top`: the contraction of ``g`` with itself over every dimension
    but ``i``."""
    others = [k for k in range(g.ndim) if k != i]
    return jnp.tensordot(g, g, axes=(others, others))


def _eigenbasis(factor: jax.Array, solves: Solves = DIRECT) -> jax.Array:
    """The eigenvectors of a factor by decreasing eigenvalue (the authors' ``eigh`` of
    ``factor + 1e-30 I``, reading its lower triangle as torch does; a batch of them alike)."""
    shifted = factor + _TINY * jnp.eye(factor.shape[-1], dtype=factor.dtype)
    return solves.eigenvectors(shifted)[..., ::-1]


def _rotate_blocks(x: jax.Array, bases: list[jax.Array | None], back: bool) -> jax.Array:
    """:func:`_rotate` of each block of a batch ``(n, *sizes)`` by its own bases ``(n, d, d)``."""
    for q in bases:
        if q is None:
            x = jnp.moveaxis(x, 1, -1)
        else:
            x = jax.lax.dot_general(x, q, (((1,), (2 if back else 1,)), ((0,), (0,))))
    return x


def _outer_blocks(x: jax.Array, i: int) -> jax.Array:
    """:func:`_outer` of each block of a batch ``(n, *sizes)``, along its dimension ``i``."""
    others = tuple(k for k in range(1, x.ndim) if k != i + 1)
    return jax.lax.dot_general(x, x, ((others, others), ((0,), (0,))))


def _refresh_blocks(
    factors: list[jax.Array | None],
    bases: list[jax.Array | None],
    mu: jax.Array,
    nu: jax.Array,
    settle: Any = None,
    orthogonalization: str = "auto",
    solves: Solves = DIRECT,
) -> tuple[list[jax.Array | None], jax.Array, jax.Array]:
    """:meth:`SoapRule._refresh` of each block of a batch (moments ``(n, *sizes)``);
    ``settle`` maps the new bases to ``(stored, used)``: as the state keeps them and as the
    steps rotate by them (the first moment is moved into the latter); ``solves`` makes the
    orthonormalizations."""
    # At float32's accuracy on accelerators too (TF32 products corrupt the estimated
    # eigenvalues, NVIDIA Emerging-Optimizers), as the authors' torch computes them.
    original = at_full_precision(functools.partial(_rotate_blocks, back=True), mu, bases)
    new_bases: list[jax.Array | None] = []
    for i, (f, basis) in enumerate(zip(factors, bases, strict=True)):
        if f is None or basis is None:
            new_bases.append(None)
            continue
        order, new_basis = solves.refreshed_basis(f, basis, orthogonalization)
        along = [1] * nu.ndim
        along[0], along[i + 1] = order.shape
        nu = jnp.take_along_axis(nu, order.reshape(along), axis=i + 1)
        new_bases.append(new_basis)
    stored, used = (new_bases, new_bases) if settle is None else settle(new_bases)
    rotated = at_full_precision(functools.partial(_rotate_blocks, back=False), original, used)
    return stored, rotated, nu


def _unpack_group(flat: jax.Array, group: BlockGroup, n: int) -> list[jax.Array | None]:
    """``n`` blocks' factors (or bases) of a group from their part ``(n * stride,)`` of a
    leaf's state: per dimension, ``(n, d, d)`` or None."""
    rows = flat.reshape(n, group.stride)
    out: list[jax.Array | None] = []
    start = 0
    for d in group.factors:
        if d is None:
            out.append(None)
        else:
            out.append(rows[:, start : start + d * d].reshape(n, d, d))
            start += d * d
    return out


def _pack_groups(groups: list[list[jax.Array | None]], like: Any) -> Any:
    """The inverse of :func:`_unpack_group` over a leaf's groups: its state's vector (a
    stack's batches by dimension, where ``like`` is one: a stack has one group)."""
    if isinstance(like, dict):
        (matrices,) = groups
        return {dimension_key(i): m for i, m in enumerate(matrices) if m is not None}
    parts = []
    for matrices in groups:
        rows = [m.reshape(m.shape[0], -1) for m in matrices if m is not None]
        if rows:
            parts.append(jnp.concatenate(rows, axis=1).reshape(-1))
    return jnp.concatenate(parts) if parts else like
