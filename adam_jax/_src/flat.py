"""The flat layout of params and state: the implementation of :mod:`adam_jax.flat`."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from adam_jax._src.typed_sharding import reshard, spec_entries, typed_sharding


@dataclasses.dataclass(frozen=True)
class _Group:
    key: str
    dtype: np.dtype
    label: Hashable
    size: int


@dataclasses.dataclass(frozen=True)
class _Slot:
    group: int  # index into FlatLayout.groups
    offset: int  # element offset inside the group's buffer
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Static description of how a tree is packed into flat buffers (hashable, compared by value).

    Attributes:
      treedef: structure of the original tree.
      slots: for every leaf of the original tree, in tree order, its group, offset and shape.
      groups: the buffers: key (``"float32"``, or ``"float32/True"`` with labels), dtype, label,
        number of elements.
    """

    treedef: Any
    slots: tuple[_Slot, ...]
    groups: tuple[_Group, ...]

    @property
    def num_leaves(self) -> int:
        return len(self.slots)

    @property
    def size(self) -> int:
        """Total number of elements over all buffers."""
        return sum(g.size for g in self.groups)

    def abstract_tree(self) -> Any:
        """The original tree with a ``jax.ShapeDtypeStruct`` for each leaf: its structure, paths
        and shapes, for what depends on them (Adam-mini's partition by layer names)."""
        return self.treedef.unflatten(
            [jax.ShapeDtypeStruct(s.shape, self.groups[s.group].dtype) for s in self.slots]
        )

    def flatten(self, tree: Any, *, cast: bool = False) -> FlatParams:
        """Packs ``tree`` (same structure, shapes and dtypes as the layout) into buffers.

        With ``cast=True`` leaves of another dtype are cast to their group's dtype (used for
        gradients of another precision than the params); otherwise a mismatch is an error.
        """
        leaves = self.treedef.flatten_up_to(tree)
        parts: list[list[jax.Array]] = [[] for _ in self.groups]
        for slot, leaf in zip(self.slots, leaves, strict=True):
            leaf = jnp.asarray(leaf)
            group = self.groups[slot.group]
            if cast and leaf.dtype != group.dtype:
                leaf = leaf.astype(group.dtype)
            if tuple(leaf.shape) != slot.shape or leaf.dtype != group.dtype:
                raise ValueError(
                    f"leaf of shape {leaf.shape} and dtype {leaf.dtype} does not match the layout "
                    f"({slot.shape}, {group.dtype})"
                )
            parts[slot.group].append(_ravel(leaf))
        buffers = tuple(
            (jnp.concatenate(_common_sharding(p)) if len(p) > 1 else p[0])
            if p
            else jnp.zeros((0,), g.dtype)
            for p, g in zip(parts, self.groups, strict=True)
        )
        return FlatParams(buffers, self)

    def unflatten(self, buffers: tuple[Any, ...]) -> Any:
        """Views of the buffers as the original tree (``jnp.split`` + ``reshape``).

        Differentiable both ways; the transpose of the split is one ``concatenate`` per buffer,
        so ``jax.grad`` w.r.t. the buffers returns a flat gradient without a pad per leaf.
        """
        return self.treedef.unflatten(self._split_leaves(buffers))

    def _split_leaves(self, buffers: tuple[Any, ...]) -> list[Any]:
        pieces: list[list[Any]] = []
        for gi, (buf, group) in enumerate(zip(buffers, self.groups, strict=True)):
            slots = [s for s in self.slots if s.group == gi]
            if isinstance(buf, (jax.Array, np.ndarray)) or hasattr(buf, "shape"):
                cuts = [s.offset for s in slots[1:]]
                pieces.append(jnp.split(buf, cuts) if cuts else [buf])
            else:  # a non-array leaf (e.g. a label or a mask value): repeat it per leaf
                pieces.append([buf] * len(slots))
            del group
        counters = [0] * len(self.groups)
        leaves = []
        for slot in self.slots:
            part = pieces[slot.group][counters[slot.group]]
            counters[slot.group] += 1
            leaves.append(part.reshape(slot.shape) if hasattr(part, "reshape") else part)
        return leaves


def _leaf_label(label: Any) -> Hashable:
    if isinstance(label, (jax.Array, np.ndarray, np.generic)):
        label = label.item()
    return label


def layout_of(tree: Any, labels: Any = None) -> FlatLayout:
    """The :class:`FlatLayout` of ``tree``, grouped by dtype and optional per-leaf ``labels``.

    Args:
      tree: a pytree of arrays (or ``jax.ShapeDtypeStruct``).
      labels: ``None``, a tree with the same structure as ``tree`` whose leaves are hashable
        labels (bools for a weight-decay mask, strings for ``optax.multi_transform``), or a
        callable ``tree -> labels tree``.

    Returns:
      The layout; leaves keep their tree order inside each group.
    """
    leaves = jax.tree.leaves(tree)
    treedef: Any = jax.tree.structure(tree)  # its methods are untyped in jax's stubs
    if callable(labels):
        labels = labels(tree)
    if labels is None:
        leaf_labels: list[Hashable] = [None] * len(leaves)
    else:
        leaf_labels = [_leaf_label(x) for x in treedef.flatten_up_to(labels)]
    groups: dict[tuple[np.dtype, Hashable], list[int]] = {}
    sizes: dict[tuple[np.dtype, Hashable], int] = {}
    slots: list[tuple[tuple[np.dtype, Hashable], int, tuple[int, ...]]] = []
    for leaf, label in zip(leaves, leaf_labels, strict=True):
        dtype = np.dtype(leaf.dtype)
        key = (dtype, label)
        groups.setdefault(key, [])
        size = int(np.prod(leaf.shape, dtype=np.int64))
        offset = sizes.get(key, 0)
        sizes[key] = offset + size
        slots.append((key, offset, tuple(int(d) for d in leaf.shape)))
    keys = list(groups)
    index = {k: i for i, k in enumerate(keys)}
    group_objs = tuple(
        _Group(
            key=str(dt) if labels is None else f"{dt}/{lab}",
            dtype=dt,
            label=lab,
            size=sizes[(dt, lab)],
        )
        for dt, lab in keys
    )
    return FlatLayout(
        treedef=treedef,
        slots=tuple(_Slot(index[k], off, shape) for k, off, shape in slots),
        groups=group_objs,
    )


def _ravel(leaf: jax.Array) -> jax.Array:
    """``leaf`` as a vector; on a mesh with Explicit axes a leaf split along an axis other than
    its first is replicated first (its raveled shards would not be contiguous)."""
    typed = typed_sharding(leaf)
    if typed is not None and any(spec_entries(typed.spec, leaf.ndim)[1:]):
        leaf = reshard(leaf, NamedSharding(typed.mesh, PartitionSpec()))
    return leaf.reshape(-1)


def _common_sharding(pieces: list[jax.Array]) -> list[jax.Array]:
    """Raveled leaves that can be concatenated: on a mesh with Explicit axes leaves sharded
    differently are replicated first (a concatenation of differently sharded pieces is a type
    error there); otherwise as they are."""
    typed = [typed_sharding(p) for p in pieces]
    mesh = next((t.mesh for t in typed if t is not None), None)
    if mesh is None or all(t == typed[0] for t in typed):
        return pieces
    replicated = NamedSharding(mesh, PartitionSpec(None))
    return [reshard(p, replicated) for p in pieces]


@jax.tree_util.register_pytree_node_class
class FlatParams:
    """Flat buffers (one 1-D array per group) plus their static :class:`FlatLayout`.

    A pytree whose children are the buffers, so it can be passed to ``jax.jit``, ``jax.grad``,
    optax transformations and ``optax.apply_updates`` as is.

    Example:
      >>> import adam_jax, jax.numpy as jnp, optax
      >>> fp = adam_jax.flat.flatten({"w": jnp.ones((2, 3)), "b": jnp.zeros(3)})
      >>> print(fp)
      FlatParams(2 leaves in float32[9])
      >>> tx = adam_jax.adam(0.1)
      >>> updates, _ = tx.update(fp, tx.init(fp))
      >>> print(optax.apply_updates(fp, updates).to_tree()["w"][0])
      [0.9 0.9 0.9]
    """

    __slots__ = ("buffers", "layout")

    def __init__(self, buffers: tuple[Any, ...], layout: FlatLayout):
        self.buffers = tuple(buffers)
        self.layout = layout

    def tree_flatten(self):
        return self.buffers, self.layout

    @classmethod
    def tree_unflatten(cls, layout: FlatLayout, buffers: Any) -> FlatParams:
        return cls(tuple(buffers), layout)

    def to_tree(self) -> Any:
        """The original tree, as views (slices) of the buffers."""
        return self.layout.unflatten(self.buffers)

    @classmethod
    def from_tree(cls, tree: Any, labels: Any = None) -> FlatParams:
        """Packs ``tree``; same as :func:`flatten`."""
        return layout_of(tree, labels).flatten(tree)

    def labels(self) -> FlatParams:
        """The label of every buffer, as a :class:`FlatParams` (a mask when labels are bools)."""
        return FlatParams(tuple(g.label for g in self.layout.groups), self.layout)

    def __getitem__(self, key: str) -> Any:
        for g, b in zip(self.layout.groups, self.buffers, strict=True):
            if g.key == key:
                return b
        raise KeyError(key)

    def __repr__(self) -> str:
        groups = ", ".join(f"{g.key}[{g.size}]" for g in self.layout.groups)
        return f"FlatParams({self.layout.num_leaves} leaves in {groups})"


def flatten(tree: Any, labels: Any = None) -> FlatParams:
    """Packs ``tree`` into one buffer per ``(dtype, label)``; ``.to_tree()`` undoes it exactly.

    Args:
      tree: a pytree of arrays (a params tree, an ``nnx.State``...).
      labels: optional per-leaf labels (see :func:`layout_of`), e.g. the weight-decay mask.

    Returns:
      A :class:`FlatParams`.
    """
    return FlatParams.from_tree(tree, labels)


def labels(params: FlatParams) -> FlatParams:
    """Per-buffer labels of a :class:`FlatParams`; pass it as ``mask=flat.labels``.

    Works as the ``mask`` of ``adam_jax.adamw`` / ``add_decayed_weights`` (bool labels) and as
    the ``param_labels`` of ``optax.multi_transform`` (string labels).
    """
    if not isinstance(params, FlatParams):
        raise TypeError(f"flat.labels expects a FlatParams, got {type(params).__name__}")
    return params.labels()


class FlatState(NamedTuple):
    """State of :func:`flat`: the inner transformation's state over the flat buffers."""

    inner_state: Any


def flat(inner: optax.GradientTransformation, labels: Any = None) -> optax.GradientTransformation:
    """Runs ``inner`` on flat buffers while the caller keeps an ordinary params tree.

    ``update`` concatenates the gradients (and params, when given) into the layout of the
    params, applies ``inner`` to the buffers and splits its updates back into the tree. The
    inner state lives over the buffers (one leaf per group instead of one per param) and the
    optimizer math is one loop per buffer, but the concatenation and split cost copies and, on
    XLA:CPU, compile slowly (see BENCHMARKS.md): prefer keeping the params themselves flat.
    Inputs that already are :class:`FlatParams` pass straight through (no copies). Extra
    arguments of ``update`` (such as ``value=loss`` from an enclosing chain) reach ``inner``
    when it accepts them.

    Args:
      inner: any gradient transformation (e.g. ``adam_jax.adamw(..., mask=flat.labels)``).
      labels: per-leaf labels of the params tree (a weight-decay mask), or a callable
        ``params -> labels``; leaves are grouped by them so that ``mask=flat.labels`` in
        ``inner`` reproduces the per-leaf mask exactly.

    Returns:
      A ``GradientTransformation`` over the original tree.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
      >>> tx = adam_jax.flat.flat(adam_jax.adam(0.1))
      >>> state = tx.init(params)
      >>> print(state.inner_state[0].mu)  # one buffer for both leaves
      FlatParams(2 leaves in float32[6])
      >>> updates, _ = tx.update(params, state)
      >>> print(jnp.round(updates["w"], 6))
      [[-0.1 -0.1]
       [-0.1 -0.1]]
    """

    # Extra arguments (``value=loss`` from an enclosing chain) reach ``inner`` only if it takes
    # them; a plain GradientTransformation drops them, as inside ``optax.chain``.
    inner = optax.with_extra_args_support(inner)

    def _layout(tree: Any) -> FlatLayout:
        return layout_of(tree, labels)

    def init_fn(params: Any) -> FlatState:
        if isinstance(params, FlatParams):
            return FlatState(inner.init(params))
        return FlatState(inner.init(_layout(params).flatten(params)))

    def update_fn(updates: Any, state: FlatState, params: Any = None, **extra: Any):
        if isinstance(updates, FlatParams):
            new, inner_state = inner.update(updates, state.inner_state, params, **extra)
            return new, FlatState(inner_state)
        if params is not None:
            layout = _layout(params)
            flat_params = layout.flatten(params)
        else:
            layout = _layout(updates)
            flat_params = None
        flat_updates = layout.flatten(updates, cast=True)
        new, inner_state = inner.update(flat_updates, state.inner_state, flat_params, **extra)
        # On Explicit meshes each update takes its gradient's sharding back.
        new_tree = jax.tree.map(lambda u, g: reshard(u, typed_sharding(g)), new.to_tree(), updates)
        return new_tree, FlatState(inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
