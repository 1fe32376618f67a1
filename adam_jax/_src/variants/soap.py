r"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al., 2024).

Shampoo preconditions a matrix gradient :math:`G` by running averages of :math:`GG^\top` and
:math:`G^\top G`. SOAP keeps those averages (one :math:`d \times d` factor per preconditioned
dimension of a tensor), rotates the gradient into their eigenbases, runs Adam there, and
rotates the result back. The eigenbases are refreshed only every ``precondition_frequency``
steps, by one step of power iteration and a QR decomposition, which Adam's moments in the
rotated basis tolerate well.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from adam_jax._src import hyperparams, validation
from adam_jax._src.branching import branch, switch
from adam_jax._src.chains import descend
from adam_jax._src.flat import FlatParams
from adam_jax._src.moving_average import StepScalars, moving_average, step_scalars
from adam_jax._src.numerics import compute_dtype
from adam_jax._src.optimizer_info import OptimizerInfo, Paper
from adam_jax._src.orthonormalization import ORTHOGONALIZATIONS, each_matrix, orthonormal
from adam_jax._src.quantization.four_bit import FourBitBlockwise, FourBitRank1
from adam_jax._src.rule import Leaf, Moment, MomentRule, scale_by_rule, second_moment
from adam_jax._src.storage import CastStorage, MomentStorage, cast_storage
from adam_jax._src.typed_sharding import replicated, replicated_placement, reshard, typed_sharding
from adam_jax._src.weight_decay import Mask

# The authors add 1e-30 times the identity before eigh, and to the RMS of normalize_grads.
_TINY = 1e-30
# The authors' max_precond_dim, which the rule's None stands for (optax.inject_hyperparams
# would inject a number as an array, and it fixes the factors' shapes).
_MAX_PRECOND_DIM = 10000


class ScaleBySoapState(NamedTuple):
    """The state of :func:`scale_by_soap`.

    Attributes:
      count: the steps taken (the first only initializes the factors and the bases).
      mu: the first moment, in the rotated basis (as the authors keep ``exp_avg``).
      nu: the second moment of the rotated gradient.
      gg: per leaf, the Kronecker factors (Shampoo's :math:`L`, :math:`R`), flattened and
        concatenated in dimension order (empty for a leaf with none); with ``block_size``,
        block after block in the order of :class:`SoapLayout` (the groups of blocks of one
        shape, full blocks first; row-major within a group), each block's factors in
        dimension order.
      q: per leaf, their eigenbases, stored alike.
    """

    count: jax.Array  # type: ignore[assignment]  # (optax states name it so too)
    mu: optax.Updates
    nu: optax.Updates
    gg: optax.Updates
    q: optax.Updates


def merged_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """The authors' ``merge_dims``: consecutive dimensions merged while their product stays
    at most ``max_precond_dim`` (a larger dimension stays alone).

    Example:
      >>> from adam_jax._src.variants.soap import merged_shape
      >>> print(merged_shape((2, 2, 4), 4), merged_shape((3, 4), 100))
      (4, 4) (12,)
      >>> print(merged_shape((20000, 3), 100))
      (20000, 3)
    """
    merged: list[int] = []
    current = 1
    for size in shape:
        if current * size > max_precond_dim:
            if current > 1:
                merged.append(current)
                current = size
            else:
                merged.append(size)
                current = 1
        else:
            current *= size
    if current > 1 or not merged:
        merged.append(current)
    return tuple(merged)


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """Blocks of a leaf that share one shape, as one batch.

    Along each dimension of the leaf's working shape the group covers the range
    ``[start, stop)`` of ``spans``, cut into ``counts`` blocks of ``sizes`` values; its
    blocks are the cartesian product of those cuts, in row-major order of their block
    coordinates (the last dimension's fastest).
    """

    spans: tuple[tuple[int, int], ...]
    counts: tuple[int, ...]
    sizes: tuple[int, ...]
    factored: tuple[bool, ...]

    @property
    def n(self) -> int:
        """The number of blocks."""
        return math.prod(self.counts)

    @property
    def factors(self) -> tuple[int | None, ...]:
        """Per dimension: the size of each block's factor, or None (identity)."""
        return tuple(s if f else None for s, f in zip(self.sizes, self.factored, strict=True))

    @property
    def stride(self) -> int:
        """The number of values of one block's flattened factors."""
        return sum(d * d for d in self.factors if d is not None)

    def split(self, x: jax.Array) -> jax.Array:
        """The group's blocks of ``x`` (in the working shape), as ``(n, *sizes)``."""
        k = len(self.sizes)
        part = x[tuple(slice(a, b) for a, b in self.spans)]
        interleaved = [v for pair in zip(self.counts, self.sizes, strict=True) for v in pair]
        part = part.reshape(interleaved).transpose([*range(0, 2 * k, 2), *range(1, 2 * k, 2)])
        return part.reshape(self.n, *self.sizes)

    def merge(self, blocks: jax.Array) -> jax.Array:
        """The inverse of :meth:`split`: the group's range of the working shape."""
        k = len(self.sizes)
        x = blocks.reshape(*self.counts, *self.sizes)
        x = x.transpose([i for d in range(k) for i in (d, k + d)])
        return x.reshape([b - a for a, b in self.spans])


@dataclasses.dataclass(frozen=True)
class SoapLayout:
    """Which dimensions of a leaf SOAP preconditions, as the authors decide it, and how they
    are cut into blocks (``block_size``).

    Blocks and the order of their state: along each dimension with a factor (of at most
    ``max_precond_dim`` values) the working shape is cut into ``n = size // block_size`` full
    blocks and, where ``block_size`` does not divide it, one last block of the remainder; a
    dimension without factor stays whole. The blocks of equal shape form a
    :class:`BlockGroup`; the groups come in row-major order of their choice, per dimension, of
    the full blocks before the last one (the group of full blocks first), the blocks of a
    group in row-major order of their coordinates, and each block's factors in dimension
    order, flattened: without blocks (or with one block), the unblocked layout.
    """

    max_precond_dim: int
    merge_dims: bool
    precondition_1d: bool
    block_size: int | None = None
    block_axis: str | None = None

    @property
    def devices(self) -> int:
        """The size of ``block_axis`` on the mesh set by ``jax.set_mesh`` (1 without it)."""
        if self.block_axis is None:
            return 1
        return _axis_size(self.block_axis)

    def placement(self, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """The devices a leaf's blocks are spread over (1: kept whole), and per group the
        blocks each device owns (its slots): ``ceil(n / devices)``, the last devices' last
        slots empty where ``devices`` does not divide ``n``. A leaf of one block is kept
        whole on every device."""
        groups = self.groups(shape)
        devices = self.devices if sum(g.n for g in groups) > 1 else 1
        return devices, tuple(-(-g.n // devices) for g in groups)

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the leaf is preconditioned in (merged for ``merge_dims``, tensors of two
        or more dimensions only)."""
        if self.merge_dims and len(shape) >= 2:
            return merged_shape(shape, self.max_precond_dim)
        return tuple(shape)

    def factors(self, shape: tuple[int, ...]) -> tuple[int | None, ...]:
        """Per dimension of :meth:`shape`: the size of its factor, or None (identity)."""
        working = self.shape(shape)
        if len(shape) == 1 and not self.precondition_1d:
            return (None,)
        return tuple(d if d <= self.max_precond_dim else None for d in working)

    def groups(self, shape: tuple[int, ...]) -> tuple[BlockGroup, ...]:
        """The leaf's blocks, by group, in the order of the state (see the class)."""
        per_dim = []
        for w, f in zip(self.shape(shape), self.factors(shape), strict=True):
            b = self.block_size
            if f is None or b is None or w <= b:
                per_dim.append([((0, w), 1, w, f is not None)])
                continue
            n, r = divmod(w, b)
            cuts = [((0, n * b), n, b, True)]
            if r:
                cuts.append(((n * b, w), 1, r, True))
            per_dim.append(cuts)
        return tuple(
            BlockGroup(
                spans=tuple(c[0] for c in choice),
                counts=tuple(c[1] for c in choice),
                sizes=tuple(c[2] for c in choice),
                factored=tuple(c[3] for c in choice),
            )
            for choice in itertools.product(*per_dim)
        )

    def num_blocks(self, shape: tuple[int, ...]) -> int:
        """The number of blocks of the leaf (1 without blocks)."""
        return sum(g.n for g in self.groups(shape))

    def refreshed_blocks(self, shape: tuple[int, ...]) -> int:
        """The number of blocks with a factor: those whose bases a refresh updates."""
        has_factor = any(f is not None for f in self.factors(shape))
        return self.num_blocks(shape) if has_factor else 0

    def size(self, shape: tuple[int, ...]) -> int:
        """The number of values of the leaf's flattened factors (with the empty slots of
        :meth:`placement`)."""
        devices, slots = self.placement(shape)
        return devices * sum(s * g.stride for s, g in zip(slots, self.groups(shape), strict=True))

    def blocks(self, shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
        """Each block's place in the working shape, in the order of the state.

        Example:
          >>> from adam_jax._src.variants.soap import SoapLayout
          >>> layout = SoapLayout(10000, merge_dims=False, precondition_1d=False, block_size=2)
          >>> [(r.start, r.stop, c.start, c.stop) for r, c in layout.blocks((3, 4))]
          [(0, 2, 0, 2), (0, 2, 2, 4), (2, 3, 0, 2), (2, 3, 2, 4)]
        """
        out = []
        for g in self.groups(shape):
            for index in itertools.product(*(range(c) for c in g.counts)):
                out.append(
                    tuple(
                        slice(a + i * s, a + (i + 1) * s)
                        for (a, _), i, s in zip(g.spans, index, g.sizes, strict=True)
                    )
                )
        return out

    def unpack_blocks(self, flat: Any, shape: tuple[int, ...]) -> list[list[Any]]:
        """Per block (in the order of :meth:`blocks`), its factors (or eigenbases) from the
        state's flattened ``gg`` (or ``q``) of a leaf of ``shape``: per dimension of
        :meth:`shape`, a matrix, or None. Spread over devices (:meth:`placement`), the vector
        is each device's part in turn, the groups' slots in each, block ``k`` of a group in
        slot ``k % slots`` of device ``k // slots``."""
        groups = self.groups(shape)
        _, slots = self.placement(shape)
        sizes = [s * g.stride for s, g in zip(slots, groups, strict=True)]
        part, offsets = sum(sizes), itertools.accumulate(sizes, initial=0)
        out: list[list[Any]] = []
        for g, s, offset in zip(groups, slots, offsets, strict=False):
            for k in range(g.n):
                device, slot = divmod(k, s)
                start = device * part + offset + slot * g.stride
                block: list[Any] = []
                for d in g.factors:
                    if d is None:
                        block.append(None)
                    else:
                        block.append(flat[start : start + d * d].reshape(d, d))
                        start += d * d
                out.append(block)
        return out

    def unpack(self, flat: Any, shape: tuple[int, ...]) -> list[Any]:
        """A leaf's factors (or eigenbases) from their flattened concatenation (the state's
        ``gg`` or ``q`` of a leaf of ``shape``, not cut into blocks): per dimension of
        :meth:`shape`, a ``d x d`` matrix, or None.

        Example:
          >>> import numpy as np
          >>> from adam_jax._src.variants.soap import SoapLayout
          >>> layout = SoapLayout(max_precond_dim=3, merge_dims=False, precondition_1d=False)
          >>> [None if q is None else q.shape for q in layout.unpack(np.arange(9), (4, 3))]
          [None, (3, 3)]
        """
        blocks = self.unpack_blocks(flat, shape)
        if len(blocks) != 1:
            raise ValueError(f"a leaf of shape {shape} has {len(blocks)} blocks: unpack_blocks")
        return blocks[0]


@dataclasses.dataclass(frozen=True)
class FactorStorage(MomentStorage):
    """The Kronecker factors (or their eigenbases) of each leaf, flattened into one vector,
    replicated where the param is sharded: in the compute dtype (at least float32) when
    ``storage`` is None, else in ``storage``'s form of that vector (a cast to ``bfloat16``,
    8-bit or 4-bit block-wise codes), loaded back in the compute dtype for the step."""

    layout: SoapLayout
    storage: MomentStorage | None = None

    def vector(self, param: Any) -> jax.ShapeDtypeStruct:
        """The flat vector of a leaf like ``param``, as the inner storage sees it."""
        size = self.layout.size(tuple(param.shape))
        return jax.ShapeDtypeStruct(
            (size,), compute_dtype(param.dtype), sharding=replicated_placement(param)
        )

    def _inner(self, stored: Any) -> MomentStorage | None:
        """The storage of ``stored``: None for a leaf without factors (an empty vector)."""
        return None if isinstance(stored, jax.Array) and stored.size == 0 else self.storage

    def init(self, param: Any) -> Any:
        shape = tuple(param.shape)
        size = self.layout.size(shape)
        if self.storage is not None and size > 0:
            stored = self.storage.init(self.vector(param))
        else:
            placement = replicated_placement(param)
            stored = jnp.zeros((size,), compute_dtype(param.dtype), device=placement)
        devices, _ = self.layout.placement(shape)
        if devices == 1:  # no block_axis, or a leaf of one block
            return stored
        # Each device's part of the vector (its blocks) on it; the stored form's other leaves
        # (the 8-bit scales) likewise where they split evenly.
        axis = str(self.layout.block_axis)
        return jax.tree.map(
            lambda x: _spread(x, axis) if x.ndim and x.shape[0] % devices == 0 else x, stored
        )

    def load(self, stored: Any) -> jax.Array:
        inner = self._inner(stored)
        return stored if inner is None else inner.load(stored)

    def store(self, value: jax.Array, stored: Any) -> Any:
        inner = self._inner(stored)
        return value.astype(stored.dtype) if inner is None else inner.store(value, stored)

    def decodes(self, stored: Any) -> bool:
        inner = self._inner(stored)
        return False if inner is None else inner.decodes(stored)


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


def _check_factor_dtype(name: str, value: Any) -> None:
    """None, a floating dtype, or a storage that keeps every value of a signed vector."""
    accepted = (
        "None, a floating dtype (e.g. jnp.bfloat16) or a MomentStorage that keeps every "
        "value of a signed vector (quantization.BlockwiseQuantized(signed=True), "
        "quantization.FourBitBlockwise)"
    )
    if value is None:
        return
    if isinstance(value, MomentStorage):
        why = None
        if value.reduces or value.per_tensor:
            why = "it reduces or depends on the param's shape"
        elif getattr(value, "signed", True) is False or isinstance(value, FourBitRank1):
            why = "it keeps non-negative values only"
        elif (
            isinstance(value, CastStorage)
            and value.dtype is not None
            and not jnp.issubdtype(value.dtype, jnp.floating)
        ):
            why = f"its dtype {jnp.dtype(value.dtype).name} is not floating"
        if why is not None:
            raise ValueError(f"{name} must be {accepted}; {type(value).__name__}: {why}")
        return
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise ValueError(f"{name} must be {accepted}, got {value!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be {accepted}, got the dtype {dtype.name}")


def _whole(x: jax.Array) -> jax.Array:
    """``x`` replicated on Auto mesh axes (constrained so under ``jit``, moved so eagerly),
    where the compiler would otherwise split a factor's sum over a sharded dimension: the
    factors would be summed in another order than on one device."""
    if isinstance(x, jax.core.Tracer):
        sharding = jax.typeof(x).sharding
        if isinstance(sharding, NamedSharding) and not sharding.mesh.empty:
            return jax.lax.with_sharding_constraint(
                x, NamedSharding(sharding.mesh, PartitionSpec())
            )
    elif isinstance(x, jax.Array):
        placed = x.sharding
        if isinstance(placed, NamedSharding) and not placed.is_fully_replicated:
            whole = NamedSharding(placed.mesh, PartitionSpec(), memory_kind=placed.memory_kind)
            return jax.device_put(x, whole)
    return x


def _like(x: jax.Array, other: jax.Array) -> jax.Array:
    """``x`` with ``other``'s typed sharding (if any)."""
    return reshard(x, typed_sharding(other))


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


def _eigenbasis(factor: jax.Array) -> jax.Array:
    """The eigenvectors of a factor by decreasing eigenvalue (the authors' ``eigh`` of
    ``factor + 1e-30 I``, reading its lower triangle as torch does; a batch of them alike)."""
    shifted = factor + _TINY * jnp.eye(factor.shape[-1], dtype=factor.dtype)

    def vectors(m: jax.Array) -> jax.Array:
        return jnp.linalg.eigh(m, UPLO="L", symmetrize_input=False)[1]

    return each_matrix(vectors, shifted)[..., ::-1]


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
) -> tuple[list[jax.Array | None], jax.Array, jax.Array]:
    """:meth:`SoapRule._refresh` of each block of a batch (moments ``(n, *sizes)``);
    ``settle`` maps the new bases to ``(stored, used)``: as the state keeps them and as the
    steps rotate by them (the first moment is moved into the latter)."""
    # At full float32 precision on accelerators too (TF32 products corrupt the estimated
    # eigenvalues, NVIDIA Emerging-Optimizers), as the authors' torch computes them.
    with jax.default_matmul_precision("highest"):
        original = _rotate_blocks(mu, bases, back=True)
        new_bases: list[jax.Array | None] = []
        for i, (f, basis) in enumerate(zip(factors, bases, strict=True)):
            if f is None or basis is None:
                new_bases.append(None)
                continue
            power = f @ basis
            estimated = jnp.sum(basis * power, axis=-2)
            order = jnp.argsort(estimated, axis=-1, descending=True)
            along = [1] * nu.ndim
            along[0], along[i + 1] = order.shape
            nu = jnp.take_along_axis(nu, order.reshape(along), axis=i + 1)
            sort = order[:, None, :]
            new_bases.append(
                orthonormal(
                    jnp.take_along_axis(power, sort, axis=2),
                    jnp.take_along_axis(basis, sort, axis=2),
                    orthogonalization,
                )
            )
        stored, used = (new_bases, new_bases) if settle is None else settle(new_bases)
        return stored, _rotate_blocks(original, used, back=False), nu


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


def _pack_groups(groups: list[list[jax.Array | None]], like: jax.Array) -> jax.Array:
    """The inverse of :func:`_unpack_group` over a leaf's groups: its state's vector."""
    parts = []
    for matrices in groups:
        rows = [m.reshape(m.shape[0], -1) for m in matrices if m is not None]
        if rows:
            parts.append(jnp.concatenate(rows, axis=1).reshape(-1))
    return jnp.concatenate(parts) if parts else like


def _assemble(groups: tuple[BlockGroup, ...], parts: list[jax.Array]) -> jax.Array:
    """The working-shape tensor from its groups' ranges (:meth:`BlockGroup.merge`), which
    come in row-major order of their cuts."""
    arrays = list(parts)
    for axis in reversed(range(len(groups[0].spans))):
        cuts = len({g.spans[axis] for g in groups})
        arrays = [
            jnp.concatenate(arrays[j : j + cuts], axis=axis) if cuts > 1 else arrays[j]
            for j in range(0, len(arrays), cuts)
        ]
    return arrays[0]


def _axis_size(axis: str) -> int:
    """The size of mesh axis ``axis`` of the mesh set by ``jax.set_mesh``."""
    mesh = jax.sharding.get_abstract_mesh()
    if axis not in mesh.axis_names:
        raise ValueError(
            f"block_axis {axis!r} must be an axis of the mesh set by jax.set_mesh(mesh) "
            f"around init and update, got a mesh with axes {mesh.axis_names}"
        )
    return mesh.shape[axis]


def _spread(x: jax.Array, axis: str) -> jax.Array:
    """``x`` with its first dimension split over mesh ``axis`` (of the mesh set by
    ``jax.set_mesh``): in its type on an Explicit axis, constrained so on an Auto one, moved
    so eagerly."""
    spec = PartitionSpec(axis)
    if not isinstance(x, jax.core.Tracer):
        return jax.device_put(x, NamedSharding(jax.sharding.get_mesh(), spec))
    mesh = jax.sharding.get_abstract_mesh()
    sharding = NamedSharding(mesh, spec)
    if mesh.axis_types[mesh.axis_names.index(axis)] == jax.sharding.AxisType.Explicit:
        return reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


@dataclasses.dataclass(frozen=True)
class _LeafBlocks:
    """A leaf's groups of blocks: the moves between the leaf (``shape``, viewed in its
    ``working`` shape) and its groups' batches of blocks, and its state's vector of factors
    or bases cut by group. Spread over mesh ``axis`` (:meth:`SoapLayout.placement`), each
    group's batch has ``devices * slots`` blocks (the last empty ones zeros), split over the
    axis, and :meth:`blockwise` computes each device's own blocks on that device."""

    groups: tuple[BlockGroup, ...]
    working: tuple[int, ...]
    shape: tuple[int, ...]
    slots: tuple[int, ...]
    axis: str | None = None
    devices: int = 1

    def split(self, x: jax.Array) -> list[jax.Array]:
        """Each group's blocks of ``x`` (in the leaf's or the working shape)."""
        xw = x.reshape(self.working)
        batches = [group.split(xw) for group in self.groups]
        if self.axis is None:
            return batches
        return [
            _spread(
                jnp.pad(_whole(b), [(0, self.devices * s - b.shape[0])] + [(0, 0)] * (b.ndim - 1)),
                self.axis,
            )
            for b, s in zip(batches, self.slots, strict=True)
        ]

    def merge(self, blocks: list[jax.Array]) -> jax.Array:
        """The inverse of :meth:`split`, in the leaf's shape."""
        if self.axis is not None:
            # Gathered before the leaf's moves, which the partitioner cannot split by blocks.
            blocks = [
                _whole(replicated(b))[: g.n] for g, b in zip(self.groups, blocks, strict=True)
            ]
        parts = [group.merge(b) for group, b in zip(self.groups, blocks, strict=True)]
        return _assemble(self.groups, parts).reshape(self.shape)

    def parts(self, flat: jax.Array) -> list[list[jax.Array | None]]:
        """Each group's matrices (:func:`_unpack_group`) from the leaf's state vector (one
        device's part of it, inside :meth:`blockwise`)."""
        sizes = (s * g.stride for s, g in zip(self.slots, self.groups, strict=True))
        edges = list(itertools.accumulate(sizes, initial=0))
        return [
            _unpack_group(flat[a:b], group, s)
            for group, s, a, b in zip(self.groups, self.slots, edges[:-1], edges[1:], strict=True)
        ]

    def blockwise(self, fn: Any, *args: Any, shared: tuple[Any, ...] = ()) -> Any:
        """``fn(*args, *shared)``, ``args`` arrays whose first dimension runs over the blocks
        (the groups' batches, the state's vectors), ``shared`` the same on every device;
        spread, each device's blocks on it alone (``jax.shard_map`` over the axis), so that
        no device holds or computes another's."""
        axis = self.axis
        if axis is None:
            return fn(*args, *shared)
        args = jax.tree.map(lambda x: _spread(x, axis), args)
        specs = jax.tree.map(lambda _: PartitionSpec(axis), args)
        shared = jax.tree.map(replicated, shared)
        whole = jax.tree.map(lambda _: PartitionSpec(), shared)
        return jax.shard_map(fn, in_specs=(*specs, *whole), out_specs=PartitionSpec(axis))(
            *args, *shared
        )


class SoapScalars(NamedTuple):
    """Per-step scalars of SOAP: the step count, Adam's weights and corrections at
    :math:`t` = ``count``, the factors' weight :math:`1-\\beta_s`, whether this step is the
    first (which only initializes) and whether the bases are refreshed after it (Python
    bools where the tree's phase is chosen before the leaves step)."""

    count: jax.Array  # type: ignore[assignment]  # (optax states name it so too)
    adam: StepScalars
    wg: Any
    first: jax.Array | bool
    refresh: jax.Array | bool


#: The phases of a SOAP step, which :func:`scale_by_soap` chooses for the whole tree: the first
#: step (which only initializes the bases), a step, a step after which every basis is refreshed.
PHASES = ("first", "step", "refresh")


def _check_shampoo_beta(name: str, value: Any) -> None:
    number = validation.static_float(value)
    if number is not None and not (number < 1.0 and math.isfinite(number)):
        raise ValueError(f"{name} must be in [0, 1), or negative for b2, got {value!r}")


def _check_axis_name(name: str, value: Any) -> None:
    if value is not None and not (isinstance(value, str) and value):
        raise ValueError(f"{name} must be None or the name of a mesh axis, got {value!r}")


def _static_count(minimum: int) -> Any:
    """The check of a field that fixes the compiled step (shapes, or a number of products):
    None, or a Python integer >= ``minimum`` (no array, no float)."""

    def check(name: str, value: Any) -> None:
        if value is None or (
            isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        ):
            return
        hint = (
            f" (it fixes the compiled step: give optax.inject_hyperparams static_args=('{name}',))"
            if hasattr(value, "shape")
            else ""
        )
        raise ValueError(f"{name} must be None or an integer >= {minimum}{hint}, got {value!r}")

    return check


@dataclasses.dataclass(frozen=True, kw_only=True)
class SoapRule(MomentRule):
    """SOAP's moment rule: see :func:`scale_by_soap`."""

    b1: Any = hyperparams.b1(0.95)
    b2: Any = hyperparams.b2(0.95)
    shampoo_beta: Any = hyperparams.hyperparam(
        -1.0,
        r"decay :math:`\beta_s` of the Kronecker factors, in [0, 1); negative (the authors' "
        "-1) uses ``b2``.",
        _check_shampoo_beta,
    )
    eps: Any = hyperparams.eps()
    precondition_frequency: Any = hyperparams.hyperparam(
        10, "steps between refreshes of the eigenbases, an integer >= 1.", hyperparams.integer(1)
    )
    stagger_refresh: bool = hyperparams.hyperparam(
        False,
        "refresh each block (each leaf, without ``block_size``) at its own offset within "
        "the ``precondition_frequency`` window, so that every step carries about "
        "``1/precondition_frequency`` of the refresh work; ``False`` (the authors' "
        "schedule, and this library's before the option): every basis at the same step.",
    )
    max_precond_dim: int | None = hyperparams.hyperparam(
        None,
        "dimensions larger than this get no factor (the identity), an integer >= 1; ``None`` "
        "is the authors' 10000. ``None`` rather than a number because "
        "``optax.inject_hyperparams`` would inject a number as an array, and this fixes "
        'shapes: pass ``static_args=("max_precond_dim",)`` to set it there.',
        _static_count(1),
    )
    block_size: int | None = hyperparams.hyperparam(
        None,
        "cut each preconditioned dimension of a leaf's working shape into blocks of at most "
        "this many values (the last one smaller where it does not divide), each block of the "
        "tensor preconditioned as its own SOAP, so that no ``eigh`` or QR is larger; an "
        "integer >= 1, or ``None``: no blocks. It fixes shapes: pass "
        '``static_args=("block_size",)`` to ``optax.inject_hyperparams``.',
        _static_count(1),
    )
    block_axis: str | None = hyperparams.hyperparam(
        None,
        "the name of a mesh axis (of the mesh set by ``jax.set_mesh`` around ``init`` and "
        "``update``) to spread each leaf's blocks over: a device keeps, accumulates, rotates "
        "by and refreshes the factors and bases of its own blocks only (``ceil(n / devices)`` "
        "of a leaf's ``n``); ``None``: every device all of them. Needs ``block_size``. With "
        "``stagger_refresh``, each device refreshes its own blocks at their offsets.",
        _check_axis_name,
    )
    merge_dims: bool = hyperparams.hyperparam(
        False,
        "merge consecutive dimensions of tensors of two or more dimensions while their product "
        "stays at most ``max_precond_dim`` (the authors' ``merge_dims``).",
    )
    precondition_1d: bool = hyperparams.hyperparam(False, "give 1-D leaves a factor too.")
    normalize_grads: bool = hyperparams.hyperparam(
        False, r"divide each leaf's direction by :math:`10^{-30}` plus its RMS."
    )
    correct_bias: bool = hyperparams.hyperparam(
        True, r"Adam's bias correction, in the step size: :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`."
    )
    mu_dtype: Any = hyperparams.mu_dtype()
    nu_dtype: Any = hyperparams.nu_dtype()
    factor_dtype: Any = hyperparams.hyperparam(
        None,
        "storage of the Kronecker factors ``gg``: ``None`` (the compute dtype, at least "
        "float32), a floating dtype such as ``jnp.bfloat16``, or a "
        ":class:`adam_jax.MomentStorage` that keeps every value of a signed vector; loaded "
        "back in the compute dtype for the step. A dtype is callable, which "
        "``optax.inject_hyperparams`` would take for a schedule: pass "
        '``static_args=("factor_dtype", "basis_dtype")`` there.',
        _check_factor_dtype,
    )
    basis_dtype: Any = hyperparams.hyperparam(
        None,
        "storage of the eigenbases ``q``, as ``factor_dtype`` (e.g. ``jnp.bfloat16``, "
        "``quantization.BlockwiseQuantized()`` for 8 bits, ``quantization.FourBitBlockwise()`` "
        "for 4); a stored basis is decoded and rectified (Björck orthonormalization) before "
        "use.",
        _check_factor_dtype,
    )
    basis_rectification: int | None = hyperparams.hyperparam(
        None,
        "Björck iterations that rectify each basis before use, an integer >= 0; ``None``: "
        ":func:`bjorck_iterations` of ``basis_dtype`` (none for float bases, two for bfloat16 "
        "and 8-bit ones, three for 4-bit). Each iteration costs as many products as the "
        "step's rotations of the gradient; ``0`` rotates by the decoded basis as it is. It "
        'fixes the compiled step: pass ``static_args=("basis_rectification",)`` to '
        "``optax.inject_hyperparams``.",
        _static_count(0),
    )
    orthogonalization: str = hyperparams.hyperparam(
        "auto",
        'how a refresh orthonormalizes the power iterate :math:`LQ`: ``"qr"``, the '
        'authors\' Householder QR; ``"cholesky_qr"``, Cholesky QR repeated until '
        "orthonormal, made of batched products, Cholesky factorizations and triangular "
        "solves (the same Q up to its columns' signs, which the update does not see); "
        '``"auto"``: QR on the CPU (the authors\' arithmetic), Cholesky QR on '
        "GPU and TPU, where QR loops over a batch of blocks (docs/speed.md).",
        hyperparams.choice(*ORTHOGONALIZATIONS),
    )

    # With stagger_refresh, per leaf of the updates (in flattening order), the index of its
    # first refreshed block among those of the whole tree: set by scale_by_soap at each step
    # (see _scale_by_soap); without it (the rule given to scale_by_rule directly), a leaf's
    # blocks are numbered from the leaf's position.
    leaf_starts: tuple[int, ...] | None = dataclasses.field(default=None, repr=False, compare=False)
    # The step's phase where scale_by_soap has chosen it for the whole tree (one of PHASES):
    # every leaf then takes that phase's branch as traced, with no branch of its own. None
    # (the rule given to scale_by_rule directly): each leaf branches on the count.
    phase: str | None = dataclasses.field(default=None, repr=False, compare=False)

    state_type = ScaleBySoapState

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_axis is not None and self.block_size is None:
            raise ValueError(
                f"block_axis={self.block_axis!r} spreads a leaf's blocks over devices: give "
                "block_size too (an integer >= 1)"
            )

    @property
    def layout(self) -> SoapLayout:
        dim = _MAX_PRECOND_DIM if self.max_precond_dim is None else self.max_precond_dim
        return SoapLayout(
            max_precond_dim=dim,
            merge_dims=self.merge_dims,
            precondition_1d=self.precondition_1d,
            block_size=self.block_size,
            block_axis=self.block_axis,
        )

    def with_leaf_starts(self, updates: Any) -> SoapRule:
        """This rule, numbering the blocks of ``updates``' leaves across the whole tree (for
        ``stagger_refresh``): a leaf's first block follows the last of the leaves before it,
        counting blocks with a factor only."""
        starts, total = [], 0
        for leaf in jax.tree.leaves(updates):
            starts.append(total)
            total += self.layout.refreshed_blocks(tuple(jnp.shape(leaf)))
        return dataclasses.replace(self, leaf_starts=tuple(starts))

    def _leaf_start(self, leaf: Leaf) -> int:
        position = leaf.position or 0
        if self.leaf_starts is None or position >= len(self.leaf_starts):
            return position
        return self.leaf_starts[position]

    def _frequency(self) -> int | None:
        """``precondition_frequency`` as a Python integer, or None where it is traced."""
        number = validation.static_float(self.precondition_frequency)
        return None if number is None else int(number)

    def _due(self, scalars: SoapScalars, offset: Any) -> jax.Array | bool:
        """Whether the bases of blocks at refresh ``offset`` are refreshed after this step."""
        if not self.stagger_refresh:
            return scalars.refresh
        count = scalars.count
        return (count > 0) & (jnp.remainder(count - offset, self.precondition_frequency) == 0)

    def moments(self) -> tuple[Moment, ...]:
        return (
            Moment("mu", self.mu_dtype),
            second_moment(self.nu_dtype),
            Moment("gg", FactorStorage(self.layout, _factor_storage(self.factor_dtype))),
            Moment("q", FactorStorage(self.layout, _factor_storage(self.basis_dtype))),
        )

    def _decoded(self, bases: list[jax.Array | None]) -> list[jax.Array | None]:
        """Bases as the step uses them: as loaded, rectified by :meth:`_rectifications`
        Björck iterations (each matrix, or each block's of a batch ``(n, d, d)``)."""
        iterations = self._rectifications()
        if iterations == 0:
            return bases
        return [None if q is None else _rectify(q, iterations) for q in bases]

    def _rectifications(self) -> int:
        """``basis_rectification``, or where None, :func:`bjorck_iterations` of the storage."""
        if self.basis_rectification is None:
            return bjorck_iterations(self.basis_dtype)
        return self.basis_rectification

    def init_fields(self, params: Any) -> dict[str, Any]:
        leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, FlatParams))
        for leaf in leaves:
            if isinstance(leaf, FlatParams):
                raise ValueError(
                    "soap needs each param in its own shape (a Kronecker factor per "
                    "dimension): FlatParams buffers are not supported"
                )
            if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
                raise ValueError(f"soap has no complex params, got a {leaf.dtype} leaf")
        return super().init_fields(params)

    def scalars(self, fields: dict[str, Any], dtype: Any) -> SoapScalars:
        count = fields["count"]
        t = jnp.maximum(count, 1)  # the Adam step of the authors (the first only initializes)
        number = validation.static_float(self.shampoo_beta)
        if number is None:  # traced (optax.inject_hyperparams): negative means b2
            shampoo_beta = jnp.where(self.shampoo_beta < 0, self.b2, self.shampoo_beta)
        else:
            shampoo_beta = self.b2 if number < 0 else self.shampoo_beta
        wg = 1 - jnp.asarray(shampoo_beta, dtype)
        first: jax.Array | bool
        refresh: jax.Array | bool
        if self.phase is None:
            first, refresh = count == 0, self.refreshes(count)
        else:
            first, refresh = self.phase == "first", self.phase == "refresh"
        return SoapScalars(count, step_scalars(self.b1, self.b2, t)(dtype), wg, first, refresh)

    def refreshes(self, count: jax.Array) -> jax.Array:
        """Whether every basis is refreshed after step ``count`` (without ``stagger_refresh``)."""
        return (count > 0) & (count % self.precondition_frequency == 0)

    def phase_of(self, count: jax.Array) -> jax.Array:
        """The index in :data:`PHASES` of step ``count``'s phase: the first step (which only
        initializes), a step, a step that refreshes every basis after it (never with
        ``stagger_refresh``, whose leaves and blocks refresh at their own offsets)."""
        if self.stagger_refresh:
            return jnp.where(count == 0, 0, 1)
        return jnp.where(count == 0, 0, jnp.where(self.refreshes(count), 2, 1))

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: SoapScalars, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        if jnp.issubdtype(g.dtype, jnp.complexfloating):
            raise ValueError("soap has no complex params")
        shape, working = g.shape, self.layout.shape(g.shape)
        groups = self.layout.groups(shape)
        if sum(group.n for group in groups) > 1:
            return self._update_blocks(g, moments, scalars, leaf, groups)
        frequency = self._frequency()
        start = self._leaf_start(leaf)
        refresh = self._due(scalars, start if frequency is None else start % frequency)
        d = scalars.adam
        # On Explicit meshes the leaf is preconditioned replicated: the factors contract every
        # other dimension, which sharded operands would leave ambiguous.
        gw = replicated(g).reshape(working)
        mu, nu = replicated(moments["mu"]), replicated(moments["nu"])
        gg, q = replicated(moments["gg"]), replicated(moments["q"])
        factors = [
            None if f is None else moving_average(f, _outer(_whole(gw), i), scalars.wg)
            for i, f in enumerate(self.layout.unpack(gg, shape))
        ]

        def initialize(operands: Any) -> Any:
            mu, nu, _ = operands
            bases = [None if f is None else _eigenbasis(f) for f in factors]
            # The moments are still zeros: in the shape the Adam branch gives them (a reducing
            # storage passes them reduced), which the core reduces back to the same zeros.
            mu, nu = (jnp.broadcast_to(m, jnp.broadcast_shapes(m.shape, shape)) for m in (mu, nu))
            return jnp.zeros(shape, g.dtype), mu, nu, _pack(bases, q)

        def adam_step(operands: Any) -> Any:
            mu, nu, bases_flat = operands
            bases = self._decoded(self.layout.unpack(bases_flat, shape))
            projected = _rotate(gw, bases, back=False).reshape(shape)
            mu, nu, direction = self._adam(projected, mu, nu, d, leaf)
            u = _rotate(direction.reshape(working), bases, back=True).reshape(shape)
            u = self._scaled(u, d)
            mu, nu, bases_flat = branch(
                refresh, self._refresh, lambda *a: a[1:], factors, mu, nu, bases_flat
            )
            return u, mu, nu, bases_flat

        return self._finish(
            g,
            moments,
            scalars,
            leaf,
            branch(scalars.first, initialize, adam_step, (mu, nu, q)),
            _pack(factors, gg),
        )

    def _adam(
        self, projected: jax.Array, mu: jax.Array, nu: jax.Array, d: StepScalars, leaf: Leaf
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Adam's moments of the gradient ``projected`` into the eigenbasis, and their
        direction there."""
        mu = moving_average(mu, projected, d.w1)
        nu = moving_average(nu, jnp.square(projected), d.w2)
        return mu, nu, mu / (jnp.sqrt(leaf.settle("nu", nu)) + self.eps)

    def _scaled(self, u: jax.Array, d: StepScalars) -> jax.Array:
        """The update rotated back, normalized (``normalize_grads``) and bias-corrected."""
        if self.normalize_grads:
            u = u / (_TINY + jnp.sqrt(jnp.mean(jnp.square(u))))
        if self.correct_bias:
            u = u * (jnp.sqrt(d.c2) / d.c1)
        return u

    def _finish(
        self,
        g: jax.Array,
        moments: dict[str, jax.Array],
        scalars: SoapScalars,
        leaf: Leaf,
        stepped: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
        factors: jax.Array,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The update (none at the first step, which only initializes; weight decay added)
        and the new moments, each in its stored form, from the branch's ``stepped`` (update,
        mu, nu, bases) and the packed ``factors``."""
        u, mu, nu, q = stepped
        u = _like(u, g)
        u = jnp.where(scalars.first, jnp.zeros_like(u), leaf.add_decay(u))
        new = {
            "mu": _like(mu, moments["mu"]),
            "nu": _like(nu, moments["nu"]),
            "gg": _like(factors, moments["gg"]),
            "q": _like(q, moments["q"]),
        }
        return u, new

    def _update_blocks(
        self,
        g: jax.Array,
        moments: dict[str, jax.Array],
        scalars: SoapScalars,
        leaf: Leaf,
        groups: tuple[BlockGroup, ...],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """:meth:`update` of a leaf cut into several blocks: each group of blocks of one shape
        as a batch (its factors and bases ``(n, d, d)``), the moments elementwise; spread over
        ``block_axis``, the blocks' products and refreshes each on its own device, the
        moments in the leaf's shape (rotated there, their blocks gathered)."""
        shape = g.shape
        devices, slots = self.layout.placement(shape)
        axis = self.block_axis if devices > 1 else None
        blocks = _LeafBlocks(groups, self.layout.shape(shape), shape, slots, axis, devices)
        d = scalars.adam
        gw = replicated(g).reshape(blocks.working)
        mu, nu = replicated(moments["mu"]), replicated(moments["nu"])
        gg, q = moments["gg"], moments["q"]
        if axis is None:
            gg, q = replicated(gg), replicated(q)
        grads = blocks.split(_whole(gw))

        def accumulate(grads: list[jax.Array], gg: jax.Array, wg: jax.Array) -> jax.Array:
            factors = [
                [
                    None if f is None else moving_average(f, _outer_blocks(x, i), wg)
                    for i, f in enumerate(old)
                ]
                for x, old in zip(grads, blocks.parts(gg), strict=True)
            ]
            return _pack_groups(factors, gg)

        factors = blocks.blockwise(accumulate, grads, gg, shared=(scalars.wg,))

        def eigenbases(factors: jax.Array, q: jax.Array) -> jax.Array:
            bases = [
                [None if f is None else _eigenbasis(f) for f in fs] for fs in blocks.parts(factors)
            ]
            return _pack_groups(bases, q)

        def project(grads: list[jax.Array], bases_flat: jax.Array) -> Any:
            bases = [self._decoded(b) for b in blocks.parts(bases_flat)]
            rotated = [_rotate_blocks(x, b, back=False) for x, b in zip(grads, bases, strict=True)]
            return rotated, bases

        def project_back(directions: list[jax.Array], bases: Any) -> list[jax.Array]:
            return [_rotate_blocks(x, b, back=True) for x, b in zip(directions, bases, strict=True)]

        def initialize(operands: Any) -> Any:
            mu, nu, q = operands
            mu, nu = (jnp.broadcast_to(m, jnp.broadcast_shapes(m.shape, shape)) for m in (mu, nu))
            return jnp.zeros(shape, g.dtype), mu, nu, blocks.blockwise(eigenbases, factors, q)

        def adam_step(operands: Any) -> Any:
            mu, nu, bases_flat = operands
            projected, bases = blocks.blockwise(project, grads, bases_flat)
            mu, nu, direction = self._adam(blocks.merge(projected), mu, nu, d, leaf)
            u = blocks.merge(blocks.blockwise(project_back, blocks.split(direction), bases))
            u = self._scaled(u, d)
            mu, nu, bases_flat = self._refresh_groups(
                factors, mu, nu, bases_flat, scalars, leaf, blocks
            )
            return u, mu, nu, bases_flat

        return self._finish(
            g,
            moments,
            scalars,
            leaf,
            branch(scalars.first, initialize, adam_step, (mu, nu, q)),
            factors,
        )

    def _refresh_groups(
        self,
        factors: jax.Array,
        mu: jax.Array,
        nu: jax.Array,
        bases_flat: jax.Array,
        scalars: SoapScalars,
        leaf: Leaf,
        blocks: _LeafBlocks,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The refresh (:func:`_refresh_blocks`) of the blocks due after this step, per group
        of blocks (the moments cut into ``(n, *sizes)``, the factors and bases ``(n, d, d)``):
        the leaf's moments and stored bases after it. The stored bases go on unchanged where
        no refresh replaces them, so that a compressed basis is not re-rounded after each
        rectification.

        Without ``stagger_refresh``, one branch for all the leaf's groups (the steps without
        refresh move nothing between the leaf and its blocks). With it, each group's blocks
        due at the step (:meth:`_refresh_due`; spread, each device's among its own), so every
        step carries about the same work."""
        groups = blocks.groups
        start = self._leaf_start(leaf)
        count = scalars.count
        firsts = list(itertools.accumulate((gr.n for gr in groups), initial=0))
        unchanged = self.basis_dtype is None and self._rectifications() == 0
        settle = None if unchanged else self._settle_blocks

        def computed(ops: Any) -> Any:
            return [
                _refresh_blocks(f, self._decoded(bs), m, v, settle, self.orthogonalization)
                for f, bs, m, v in ops
            ]

        def unzipped(outs: Any, bases_flat: jax.Array) -> Any:
            """Each group's (bases, mu, nu) as the groups' mus, nus and the bases' vector."""
            new_flat = _pack_groups([list(bs) for bs, _, _ in outs], bases_flat)
            return [m for _, m, _ in outs], [v for _, _, v in outs], new_flat

        def refreshed(factors: jax.Array, bases_flat: jax.Array, mus: Any, nus: Any) -> Any:
            parts = (blocks.parts(factors), blocks.parts(bases_flat), mus, nus)
            return unzipped(computed(zip(*parts, strict=True)), bases_flat)

        def all_due(mu: jax.Array, nu: jax.Array, bases_flat: Any) -> Any:
            mus, nus, new_flat = blocks.blockwise(
                refreshed, factors, bases_flat, blocks.split(mu), blocks.split(nu)
            )
            return blocks.merge(mus), blocks.merge(nus), new_flat

        if not self.stagger_refresh:
            return branch(scalars.refresh, all_due, lambda *ops: ops, mu, nu, bases_flat)

        def staggered(
            factors: jax.Array,
            bases_flat: jax.Array,
            mus: Any,
            nus: Any,
            count: jax.Array,
            period: jax.Array,
        ) -> Any:
            # Spread, slot k of device i holds block i * slots + k of its group
            # (SoapLayout.placement): each device picks the due blocks among its own.
            device = 0 if blocks.axis is None else jax.lax.axis_index(blocks.axis)
            ops = zip(blocks.parts(factors), blocks.parts(bases_flat), mus, nus, strict=True)
            outs = []
            for gr, slots, first, op in zip(groups, blocks.slots, firsts[:-1], ops, strict=True):
                offset = start + first + device * slots
                owned = jnp.minimum(slots, gr.n - device * slots)  # the rest: empty slots
                outs.append(self._refresh_due(op, count, period, offset, slots, owned, computed))
            return unzipped(outs, bases_flat)

        # The period passed in, not closed over: shard_map refuses a traced one from outside.
        period = jnp.asarray(self.precondition_frequency)
        mus, nus, new_flat = blocks.blockwise(
            staggered,
            factors,
            bases_flat,
            blocks.split(mu),
            blocks.split(nu),
            shared=(count, period),
        )
        return blocks.merge(mus), blocks.merge(nus), new_flat

    def _refresh_due(
        self,
        op: tuple[Any, Any, jax.Array, jax.Array],
        count: jax.Array,
        period: jax.Array,
        offset: Any,
        slots: int,
        owned: Any,
        computed: Any,
    ) -> tuple[Any, jax.Array, jax.Array]:
        """The bases and moments of a batch of ``slots`` blocks (factors, bases, mu, nu) after
        the refresh of those due at ``count`` (every ``period`` steps): block ``k`` (of the
        first ``owned``, the others empty) at refresh offset ``offset + k``. With a static
        ``precondition_frequency`` the due ones are gathered (``ceil(slots / frequency)``
        every step), refreshed as a batch by ``computed`` and put back; a batch of at most
        one due block is refreshed in a branch; a traced frequency refreshes the batch in a
        branch taken when any is due."""
        frequency = self._frequency()

        def unrefreshed(ops: Any) -> Any:
            return [ops[0][1:]]

        if frequency is None:
            k = jnp.arange(slots)
            due = (jnp.remainder(count - offset - k, period) == 0) & (k < owned)
            new = branch(jnp.any(due), computed, unrefreshed, [op])[0]
        else:
            m = -(-slots // frequency)
            # Block k is due when offset + k = count (mod frequency).
            index = jnp.remainder(count - offset, frequency) + frequency * jnp.arange(m)
            valid = index < owned
            picked = jax.tree.map(lambda x: x[jnp.minimum(index, slots - 1)], op)
            if m == 1:
                new = branch(valid[0], computed, unrefreshed, [picked])[0]
            else:
                new = computed([picked])[0]
            # Put back by selection, not by a scatter that drops the invalid indices: inside
            # shard_map, XLA:CPU (jaxlib 0.10.2) wrote such a scatter's updates into the
            # blocks of the devices that had none due.
            hit = (jnp.arange(slots)[:, None] == index[None, :]) & valid[None, :]
            due = hit.any(axis=1)
            new = jax.tree.map(lambda y: y[jnp.argmax(hit, axis=1)], new)

        def select(a: jax.Array, b: jax.Array) -> jax.Array:
            return jnp.where(due.reshape(-1, *[1] * (a.ndim - 1)), a, b)

        return jax.tree.map(select, new, op[1:])

    def _refresh(
        self, factors: list[jax.Array | None], mu: jax.Array, nu: jax.Array, bases_flat: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The authors' ``get_orthogonal_matrix_QR``: each basis sorted by the estimated
        eigenvalues :math:`\\mathrm{diag}(Q^\\top F Q)` (the second moment permuted alike),
        one power-iteration step :math:`F Q` and the Q of its QR decomposition
        (``orthogonalization``); the first moment moved from the old basis into the new one.
        Its products at full precision, as :func:`_refresh_blocks`'."""
        shape, working = mu.shape, self.layout.shape(mu.shape)
        with jax.default_matmul_precision("highest"):
            bases = self._decoded(self.layout.unpack(bases_flat, shape))
            original = _rotate(mu.reshape(working), bases, back=True)
            nu = nu.reshape(working)
            new_bases: list[jax.Array | None] = []
            for i, (f, basis) in enumerate(zip(factors, bases, strict=True)):
                if f is None or basis is None:
                    new_bases.append(None)
                    continue
                estimated = jnp.sum(basis * (f @ basis), axis=0)
                order = jnp.argsort(estimated, descending=True)
                nu = jnp.take(nu, order, axis=i)
                sorted_basis = basis[:, order]
                new_bases.append(
                    orthonormal(f @ sorted_basis, sorted_basis, self.orthogonalization)
                )
            new_flat = self._as_stored(_pack(new_bases, bases_flat))
            mu = _rotate(original, self._decoded(self.layout.unpack(new_flat, shape)), back=False)
        return mu.reshape(shape), nu.reshape(shape), new_flat

    def _settle_blocks(
        self, bases: list[jax.Array | None]
    ) -> tuple[list[jax.Array | None], list[jax.Array | None]]:
        """New bases of a batch of blocks ``(n, d, d)`` as stored (rounded by
        ``basis_dtype``, each block's bases one row of a ``(n, stride)`` array: the rounding
        of the state's vector where its blocks of codes align with the rows) and as used
        (rectified)."""
        present = [b for b in bases if b is not None]
        n = present[0].shape[0]
        rows = self._as_stored(jnp.concatenate([b.reshape(n, -1) for b in present], axis=1))
        stored: list[jax.Array | None] = []
        start = 0
        for b in bases:
            if b is None:
                stored.append(None)
                continue
            stored.append(rows[:, start : start + b[0].size].reshape(b.shape))
            start += b[0].size
        return stored, self._decoded(stored)

    def _as_stored(self, flat: jax.Array) -> jax.Array:
        """New bases ``flat`` (a leaf's vector) as the next step will load them: rounded by
        ``basis_dtype`` (stored and loaded back), so that the first moment is moved into the
        basis the steps use; unchanged without ``basis_dtype``."""
        storage = _factor_storage(self.basis_dtype)
        if storage is None or flat.size == 0:
            return flat
        vector = jax.ShapeDtypeStruct(flat.shape, flat.dtype)
        return storage.load(storage.store(flat, storage.init(vector))).astype(flat.dtype)


def _scale_by_soap(rule: SoapRule, **others: Any) -> optax.GradientTransformation:
    """The transformation of ``rule``, its step's phase (:meth:`SoapRule.phase_of`) chosen
    once for the whole tree: one branch a step, in which every leaf takes that phase's
    arithmetic, where a branch per leaf would cost a GPU one synchronization with the host
    each (docs/speed.md). With ``stagger_refresh``, the blocks numbered across the whole tree
    of each step's updates (their shapes are static, so the numbering is too)."""

    def update_fn(
        updates: optax.Updates, state: Any, params: optax.Params | None = None
    ) -> tuple[optax.Updates, Any]:
        numbered = rule.with_leaf_starts(updates) if rule.stagger_refresh else rule
        phases = [
            scale_by_rule(dataclasses.replace(numbered, phase=phase), **others).update
            for phase in PHASES[: 2 if rule.stagger_refresh else 3]
        ]
        return switch(rule.phase_of(state.count), phases, updates, state, params)

    return optax.GradientTransformation(scale_by_rule(rule, **others).init, update_fn)


def scale_by_soap(
    b1: float | jax.Array = 0.95,
    b2: float | jax.Array = 0.95,
    shampoo_beta: float | jax.Array = -1.0,
    eps: float | jax.Array = 1e-8,
    *,
    precondition_frequency: int = 10,
    stagger_refresh: bool = False,
    max_precond_dim: int | None = None,
    block_size: int | None = None,
    block_axis: str | None = None,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    correct_bias: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    factor_dtype: Any = None,
    basis_dtype: Any = None,
    basis_rectification: int | None = None,
    orthogonalization: str = "auto",
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by SOAP: Adam in the eigenbasis of Shampoo's preconditioner
    (Vyas et al., 2024, Algorithms 2 and 3).

    For each leaf :math:`G_t` (viewed in its working shape, see ``merge_dims``) and each of its
    preconditioned dimensions :math:`i` (size at most ``max_precond_dim``; 1-D leaves only with
    ``precondition_1d``, scalars never), a Kronecker factor and its eigenbasis:

    .. math::
        L^{(i)}_t = \beta_s L^{(i)}_{t-1} + (1-\beta_s)\, G_{(i)} G_{(i)}^\top, \qquad
        \tilde G = G \times_1 Q^{(1)\top} \cdots \times_k Q^{(k)\top},

    (:math:`G_{(i)}` the unfolding of :math:`G` along :math:`i`, :math:`\times_i` the product
    along dimension :math:`i`, the identity for a dimension without factor), then Adam in the
    rotated basis, rotated back:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) \tilde G_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) \tilde G_t^2, \\
        u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
        \Big(\frac{m_t}{\sqrt{v_t} + \epsilon}\Big) \times_1 Q^{(1)} \cdots \times_k Q^{(k)}
        + \lambda_t \theta_{t-1}.

    The first call only sets :math:`L_1` and :math:`Q = \mathrm{eigh}(L_1)` (eigenvectors by
    decreasing eigenvalue) and returns a zero update; Adam's step :math:`t` counts from the
    second call. After every step whose :math:`t` is a multiple of ``precondition_frequency``,
    each basis is refreshed by one power-iteration step: the columns of :math:`Q` sorted by
    :math:`\mathrm{diag}(Q^\top L Q)` decreasing (and :math:`v` permuted alike), then
    :math:`Q \leftarrow \mathrm{qr}(L Q)`, and :math:`m` moved into the new basis. The
    refresh is a branch of the compiled step (no host round trip), its products at
    ``Precision.HIGHEST`` on every backend (TF32 products would corrupt the estimated
    eigenvalues on a GPU).

    ``orthogonalization`` chooses how :math:`\mathrm{qr}(LQ)` is computed: ``"qr"``, the
    authors' Householder QR; ``"cholesky_qr"``, Cholesky QR (:math:`X \leftarrow X R^{-1}`,
    :math:`R^\top R = X^\top X`) repeated until the columns are orthonormal, made of batched
    products, Cholesky factorizations and triangular solves only, after scaling the columns to
    unit norm, with a shift while the Gram matrix is far from the identity, and with a column
    that depends on the others (a rank-deficient factor's) completed by the previous basis; its
    Q is QR's up to the columns' signs, which leave the update unchanged. ``"auto"`` (the
    default) takes QR on the CPU (the authors' arithmetic; on the 2-core machine
    neither method was faster on both settings measured) and Cholesky QR on GPU and TPU, where
    jaxlib's QR loops over a batch of blocks (on an H100 the blocks' Cholesky QRs took 1/34 of
    their QRs' time; docs/speed.md, "SOAP on a GPU").

    Without ``correct_bias`` the factor :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)` is 1; with
    ``normalize_grads`` the rotated-back direction is divided by :math:`10^{-30}` plus its RMS
    first.

    With ``block_size`` :math:`b`, each preconditioned dimension of the working shape is cut
    into blocks of :math:`b` values (the last one smaller where :math:`b` does not divide it;
    a dimension without factor stays whole), and each block :math:`G^{[j]}` of the tensor (a
    product of one cut per dimension) is preconditioned as its own SOAP: its own factors
    :math:`L^{[j](i)}`, bases :math:`Q^{[j](i)}` and refreshes, so no ``eigh`` or QR is
    larger than :math:`b \times b`. Adam's moments stay elementwise, and ``normalize_grads``
    takes the RMS of the whole leaf's direction (levanter's SOAP and Distributed Shampoo cut
    matrices alike). Blocks of one shape are batched (one ``eigh``, QR or product per group
    of blocks, not per block).

    With ``block_axis`` (a mesh axis of the mesh set by ``jax.set_mesh``), each leaf's blocks
    of one shape are dealt out in order over the axis's devices, ``ceil(n / devices)`` each:
    a device keeps, accumulates, rotates by and refreshes its own blocks' factors and bases
    only (``jax.shard_map``), and the rotated gradient and the update are gathered into the
    leaf's shape for Adam's moments; the updates are those of one device.

    With ``stagger_refresh``, the blocks that have a factor are numbered across the tree
    (:math:`j = 0, 1, \dots`, leaf after leaf in flattening order, a leaf without blocks one
    block) and block :math:`j` is refreshed after the steps :math:`t > 0` with

    .. math::
        t \equiv j \pmod{f}, \qquad f = \texttt{precondition\_frequency},

    so every step refreshes about :math:`1/f` of the blocks, where without it every basis is
    refreshed after the steps :math:`t \equiv 0 \pmod f` and that step carries the whole
    refresh. The default is ``False``: the authors' schedule; staggering changes when each
    basis turns (a block may refresh as early as :math:`t = 1`), not how.

    The step's phase (the first step, which only builds the bases; a step; a step after which
    every basis is refreshed) is chosen once for the whole tree: one ``jax.lax.switch`` a step,
    in whose branch every leaf takes that phase's arithmetic (a branch per leaf made the step
    between refreshes twice as long on an H100: docs/speed.md, "One branch a step").

    Factors and bases are kept per leaf, flattened (state fields ``gg`` and ``q``), in the
    compute dtype (at least float32) by default. ``factor_dtype`` stores the factors in another
    form (``jnp.bfloat16`` halves them), loaded back in the compute dtype for the step.
    ``basis_dtype`` stores the bases so (``jnp.bfloat16``; 8-bit block-wise codes,
    ``quantization.BlockwiseQuantized()``, about 1.02 bytes a value; 4-bit,
    ``quantization.FourBitBlockwise()``, about 0.53), the flat vector quantized in blocks. As
    in 4-bit Shampoo (Wang et al., 2024), a decoded basis :math:`\hat Q` is rectified before
    use by Björck orthonormalization, per matrix (per block with ``block_size``):

    .. math::
        \hat Q \leftarrow \tfrac12\, \hat Q \big(3I - \hat Q^\top \hat Q\big),

    which takes :math:`\|\hat Q^\top \hat Q - I\| = \varepsilon` to about
    :math:`\tfrac34 \varepsilon^2` (:func:`bjorck_iterations`): two iterations take 8-bit
    and bfloat16 bases (:math:`\varepsilon \approx` 1e-2, 1.5e-3 at :math:`d = 48, 64`) to
    float32 rounding (~4e-7), where one leaves 8-bit ones at ~3e-4; 4-bit bases
    (:math:`\varepsilon` 0.16 to 0.2) get three, which take them to ~1e-4 where two leave
    5e-3 to 8e-3. Each iteration costs two :math:`d \times d` products per basis and step,
    as many as the step's own rotations of the gradient: ``basis_rectification`` sets their
    number (``0`` rotates by the decoded basis as it is, whose preconditioner
    :math:`\hat Q D \hat Q^\top` stays symmetric and positive; one iteration takes
    bfloat16 bases from ~3e-3 to ~1e-5 at :math:`d` = 64 and 128). ``eigh`` and QR produce a
    new basis in the compute dtype, then it is stored compressed, and the refresh moves :math:`m`
    into the basis as the steps will decode and rectify it (exactly for a leaf without blocks; with
    blocks, each block's bases rounded as one row, which is the state's rounding where the storage's
    blocks of codes align with the blocks', as for ``block_size`` 128 and 8-bit or 4-bit codes of
    256 or 128 values); between refreshes the stored codes are kept as they are (the rectified basis
    is not re-rounded). The defaults (``None``) store the factors and bases as computed. On
    Explicit meshes each leaf is preconditioned replicated (ZeRO-1 may shard the stored state).
    ``FlatParams`` buffers and complex params are refused. Unlike the authors' code, ``eigh``
    and QR run in that compute dtype (the authors' in float32 whatever the params'), and
    their ``data_format`` (channels-last convolutions) is not offered: in JAX the layout is the
    param's.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      shampoo_beta: decay :math:`\beta_s` of the Kronecker factors, in [0, 1); negative (the
        authors' -1) uses ``b2``.
      eps: added to the denominator outside the square root, >= 0.
      precondition_frequency: steps between refreshes of the eigenbases, an integer >= 1.
      stagger_refresh: refresh each block (each leaf, without ``block_size``) at its own offset
        within the ``precondition_frequency`` window, so that every step carries about
        ``1/precondition_frequency`` of the refresh work; ``False`` (the authors' schedule, and this
        library's before the option): every basis at the same step.
      max_precond_dim: dimensions larger than this get no factor (the identity), an integer >= 1;
        ``None`` is the authors' 10000. ``None`` rather than a number because
        ``optax.inject_hyperparams`` would inject a number as an array, and this fixes shapes: pass
        ``static_args=("max_precond_dim",)`` to set it there.
      block_size: cut each preconditioned dimension of a leaf's working shape into blocks of at most
        this many values (the last one smaller where it does not divide), each block of the tensor
        preconditioned as its own SOAP, so that no ``eigh`` or QR is larger; an integer >= 1, or
        ``None``: no blocks. It fixes shapes: pass ``static_args=("block_size",)`` to
        ``optax.inject_hyperparams``.
      block_axis: the name of a mesh axis (of the mesh set by ``jax.set_mesh`` around ``init`` and
        ``update``) to spread each leaf's blocks over: a device keeps, accumulates, rotates by and
        refreshes the factors and bases of its own blocks only (``ceil(n / devices)`` of a leaf's
        ``n``); ``None``: every device all of them. Needs ``block_size``. With ``stagger_refresh``,
        each device refreshes its own blocks at their offsets.
      merge_dims: merge consecutive dimensions of tensors of two or more dimensions while their
        product stays at most ``max_precond_dim`` (the authors' ``merge_dims``).
      precondition_1d: give 1-D leaves a factor too.
      normalize_grads: divide each leaf's direction by :math:`10^{-30}` plus its RMS.
      correct_bias: Adam's bias correction, in the step size:
        :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      factor_dtype: storage of the Kronecker factors ``gg``: ``None`` (the compute dtype, at least
        float32), a floating dtype such as ``jnp.bfloat16``, or a :class:`adam_jax.MomentStorage`
        that keeps every value of a signed vector; loaded back in the compute dtype for the step. A
        dtype is callable, which ``optax.inject_hyperparams`` would take for a schedule: pass
        ``static_args=("factor_dtype", "basis_dtype")`` there.
      basis_dtype: storage of the eigenbases ``q``, as ``factor_dtype`` (e.g. ``jnp.bfloat16``,
        ``quantization.BlockwiseQuantized()`` for 8 bits, ``quantization.FourBitBlockwise()`` for
        4); a stored basis is decoded and rectified (Björck orthonormalization) before use.
      basis_rectification: Björck iterations that rectify each basis before use, an integer >= 0;
        ``None``: :func:`bjorck_iterations` of ``basis_dtype`` (none for float bases, two for
        bfloat16 and 8-bit ones, three for 4-bit). Each iteration costs as many products as the
        step's rotations of the gradient; ``0`` rotates by the decoded basis as it is. It fixes the
        compiled step: pass ``static_args=("basis_rectification",)`` to
        ``optax.inject_hyperparams``.
      orthogonalization: how a refresh orthonormalizes the power iterate :math:`LQ`: ``"qr"``, the
        authors' Householder QR; ``"cholesky_qr"``, Cholesky QR repeated until orthonormal, made of
        batched products, Cholesky factorizations and triangular solves (the same Q up to its
        columns' signs, which the update does not see); ``"auto"``: QR on the CPU (the authors'
        arithmetic), Cholesky QR on GPU and TPU, where QR loops over a batch of blocks
        (docs/speed.md).
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleBySoapState`.

    References:
      Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson and Kakade, `SOAP: Improving
      and Stabilizing Shampoo using Adam <https://arxiv.org/abs/2409.11321>`_, ICLR 2025; the
      authors' code, https://github.com/nikhilvyas/SOAP. Wang, Li, Zhou and Huang, `4-bit
      Shampoo for Memory-Efficient Network Training <https://arxiv.org/abs/2405.18144>`_,
      NeurIPS 2024 (the rectification of decoded bases).

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_soap()
      >>> params = jnp.zeros((2, 2))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([[1.0, 0.0], [0.0, 2.0]]), state)
      >>> print(jnp.abs(updates).max())  # the first call only builds the bases
      0.0
      >>> updates, state = tx.update(jnp.array([[1.0, 0.0], [0.0, 2.0]]), state)
      >>> print(jnp.round(updates, 4))  # then Adam's first step in their eigenbasis: signs
      [[1. 0.]
       [0. 1.]]
    """
    return _scale_by_soap(
        SoapRule(
            b1=b1,
            b2=b2,
            shampoo_beta=shampoo_beta,
            eps=eps,
            precondition_frequency=precondition_frequency,
            stagger_refresh=stagger_refresh,
            max_precond_dim=max_precond_dim,
            block_size=block_size,
            block_axis=block_axis,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            correct_bias=correct_bias,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            factor_dtype=factor_dtype,
            basis_dtype=basis_dtype,
            basis_rectification=basis_rectification,
            orthogonalization=orthogonalization,
        ),
        weight_decay=weight_decay,
        mask=mask,
    )


def soap(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.95,
    b2: float | jax.Array = 0.95,
    shampoo_beta: float | jax.Array = -1.0,
    eps: float | jax.Array = 1e-8,
    *,
    precondition_frequency: int = 10,
    stagger_refresh: bool = False,
    max_precond_dim: int | None = None,
    block_size: int | None = None,
    block_axis: str | None = None,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    correct_bias: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    factor_dtype: Any = None,
    basis_dtype: Any = None,
    basis_rectification: int | None = None,
    orthogonalization: str = "auto",
    weight_decay: optax.ScalarOrSchedule = 0.01,
    mask: Mask | None = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""SOAP (Vyas et al., 2024): Adam in the eigenbasis of Shampoo's preconditioner, with
    decoupled weight decay.

    .. math::
        \theta_t = \theta_{t-1} - \eta_t \big(u_t + \lambda_t \theta_{t-1}\big),

    with :math:`u_t` of :func:`scale_by_soap` (zero at the first step, which only builds the
    eigenbases: no decay either). The defaults are the authors' (``lr=3e-3`` aside, which
    is yours to give). The decay is optax's AdamW's, on the params before the step, where the
    authors' code multiplies the params after the step by :math:`1-\eta\lambda`, which scales
    the step by :math:`1-\eta\lambda` too.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      shampoo_beta: decay :math:`\beta_s` of the Kronecker factors, in [0, 1); negative (the
        authors' -1) uses ``b2``.
      eps: added to the denominator outside the square root, >= 0.
      precondition_frequency: steps between refreshes of the eigenbases, an integer >= 1.
      stagger_refresh: refresh each block (each leaf, without ``block_size``) at its own offset
        within the ``precondition_frequency`` window, so that every step carries about
        ``1/precondition_frequency`` of the refresh work; ``False`` (the authors' schedule, and this
        library's before the option): every basis at the same step.
      max_precond_dim: dimensions larger than this get no factor (the identity), an integer >= 1;
        ``None`` is the authors' 10000. ``None`` rather than a number because
        ``optax.inject_hyperparams`` would inject a number as an array, and this fixes shapes: pass
        ``static_args=("max_precond_dim",)`` to set it there.
      block_size: cut each preconditioned dimension of a leaf's working shape into blocks of at most
        this many values (the last one smaller where it does not divide), each block of the tensor
        preconditioned as its own SOAP, so that no ``eigh`` or QR is larger; an integer >= 1, or
        ``None``: no blocks. It fixes shapes: pass ``static_args=("block_size",)`` to
        ``optax.inject_hyperparams``.
      block_axis: the name of a mesh axis (of the mesh set by ``jax.set_mesh`` around ``init`` and
        ``update``) to spread each leaf's blocks over: a device keeps, accumulates, rotates by and
        refreshes the factors and bases of its own blocks only (``ceil(n / devices)`` of a leaf's
        ``n``); ``None``: every device all of them. Needs ``block_size``. With ``stagger_refresh``,
        each device refreshes its own blocks at their offsets.
      merge_dims: merge consecutive dimensions of tensors of two or more dimensions while their
        product stays at most ``max_precond_dim`` (the authors' ``merge_dims``).
      precondition_1d: give 1-D leaves a factor too.
      normalize_grads: divide each leaf's direction by :math:`10^{-30}` plus its RMS.
      correct_bias: Adam's bias correction, in the step size:
        :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      factor_dtype: storage of the Kronecker factors ``gg``: ``None`` (the compute dtype, at least
        float32), a floating dtype such as ``jnp.bfloat16``, or a :class:`adam_jax.MomentStorage`
        that keeps every value of a signed vector; loaded back in the compute dtype for the step. A
        dtype is callable, which ``optax.inject_hyperparams`` would take for a schedule: pass
        ``static_args=("factor_dtype", "basis_dtype")`` there.
      basis_dtype: storage of the eigenbases ``q``, as ``factor_dtype`` (e.g. ``jnp.bfloat16``,
        ``quantization.BlockwiseQuantized()`` for 8 bits, ``quantization.FourBitBlockwise()`` for
        4); a stored basis is decoded and rectified (Björck orthonormalization) before use.
      basis_rectification: Björck iterations that rectify each basis before use, an integer >= 0;
        ``None``: :func:`bjorck_iterations` of ``basis_dtype`` (none for float bases, two for
        bfloat16 and 8-bit ones, three for 4-bit). Each iteration costs as many products as the
        step's rotations of the gradient; ``0`` rotates by the decoded basis as it is. It fixes the
        compiled step: pass ``static_args=("basis_rectification",)`` to
        ``optax.inject_hyperparams``.
      orthogonalization: how a refresh orthonormalizes the power iterate :math:`LQ`: ``"qr"``, the
        authors' Householder QR; ``"cholesky_qr"``, Cholesky QR repeated until orthonormal, made of
        batched products, Cholesky factorizations and triangular solves (the same Q up to its
        columns' signs, which the update does not see); ``"auto"``: QR on the CPU (the authors'
        arithmetic), Cholesky QR on GPU and TPU, where QR loops over a batch of blocks
        (docs/speed.md).
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation`` (a chain ending in the learning rate).

    References:
      Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
      <https://arxiv.org/abs/2409.11321>`_, ICLR 2025; the authors' code,
      https://github.com/nikhilvyas/SOAP.

    Example:
      >>> import adam_jax, jax, jax.numpy as jnp, optax
      >>> tx = adam_jax.soap(3e-2, weight_decay=0.0)
      >>> params = jnp.array([[2.0, -1.0], [0.5, 1.0]])
      >>> loss = lambda p: jnp.sum(p**2)
      >>> state = tx.init(params)
      >>> for _ in range(50):
      ...     updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(round(float(loss(params)), 3))  # from 6.25
      0.646
    """
    return descend(
        learning_rate,
        scale_by_soap(
            b1=b1,
            b2=b2,
            shampoo_beta=shampoo_beta,
            eps=eps,
            precondition_frequency=precondition_frequency,
            stagger_refresh=stagger_refresh,
            max_precond_dim=max_precond_dim,
            block_size=block_size,
            block_axis=block_axis,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            correct_bias=correct_bias,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            factor_dtype=factor_dtype,
            basis_dtype=basis_dtype,
            basis_rectification=basis_rectification,
            orthogonalization=orthogonalization,
            weight_decay=weight_decay,
            mask=mask,
        ),
        maximize=maximize,
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="soap",
        alias=soap,
        group="variant",
        summary="Adam in the eigenbasis of Shampoo's Kronecker factors, refreshed every few steps",
        paper=Paper(
            authors="Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson and Kakade",
            title="SOAP: Improving and Stabilizing Shampoo using Adam",
            url="https://arxiv.org/abs/2409.11321",
            venue="ICLR 2025",
        ),
        transformation=scale_by_soap,
        rule=SoapRule,
        # The default rate (3e-3): the authors' default, not tuned on the MNIST example.
    ),
)
