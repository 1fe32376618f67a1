"""How optimizer moments are stored between steps.

The transformations compute in at least float32 and hand each new moment to a
:class:`MomentStorage`, which decides its stored form: a plain cast (:func:`cast_storage`, the
default), a compressed encoding such as 8-bit block-wise quantization, or a reduced form that
keeps fewer values than the param has elements (block means, factored rows and columns). The
stored form of one leaf may itself be a pytree; the moment trees then have the params tree as
a prefix. :func:`per_leaf` chooses a storage for each leaf from the params tree (for
:class:`adam_jax.FlatParams`, from the tree they pack).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


class MomentStorage(abc.ABC):
    """The stored form of one moment leaf.

    Subclass it to store moments in a form of your own; any class works (it need not be
    hashable or frozen), since the transformations only call its three methods.

    Example:
      >>> import dataclasses, adam_jax, jax.numpy as jnp
      >>> @dataclasses.dataclass
      ... class Float16(adam_jax.MomentStorage):
      ...     def init(self, param):
      ...         return jnp.zeros(param.shape, jnp.float16)
      ...     def load(self, stored):
      ...         return stored
      ...     def store(self, value, stored):
      ...         return value.astype(stored.dtype)
      >>> tx = adam_jax.adam(1e-3, nu_dtype=Float16())
      >>> _, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
      >>> print(state[0].nu.dtype, state[0].nu)
      float16 [0.001 0.001]
    """

    @abc.abstractmethod
    def init(self, param: Any) -> Any:
        """Returns the stored zeros for a leaf shaped like ``param`` (array or ShapeDtypeStruct)."""

    @abc.abstractmethod
    def load(self, stored: Any) -> jax.Array:
        """Returns the moment held in ``stored`` as an array."""

    @abc.abstractmethod
    def store(self, value: jax.Array, stored: Any) -> Any:
        """Encodes ``value`` into a stored form with the same structure, shapes and dtypes as
        ``stored``."""

    #: Whether the stored form keeps fewer values than the param has elements (block means,
    #: factored rows and columns). The step must then use the moment as it will be stored, so
    #: a rule keeps such a moment only if it :meth:`~adam_jax.rules.Leaf.settle` s it.
    reduces: bool = False

    #: Whether the stored form depends on the param's shape, not only on its elements in
    #: order (as row and column maxima do). On a buffer of :class:`adam_jax.FlatParams` the
    #: core applies such a storage, and any reducing one, to each packed tensor in its own
    #: shape (:class:`adam_jax.rules.SegmentedStorage`), so that flat params keep the tree's
    #: state; other storages keep the whole buffer as one vector.
    per_tensor: bool = False

    #: Whether a slice of the leaf's rows (its first axis) is stored as the same slice of each
    #: array of the stored form (cut along its own first axis, which may give one entry to
    #: several rows, as a block scale does): so a large leaf can be stepped a slice of rows at a
    #: time (:func:`adam_jax.step_in_slices`) with the same results. True for plain casts and
    #: 8-bit blocks; not for a storage with column statistics (factored, 4-bit rank-1).
    row_slices: bool = False

    #: Whether the stored codes have the param's shape (8-bit codes, one an element), so that
    #: the kernel that writes the param can write them. 4-bit codes, two a byte, are written
    #: by a kernel of their own, which the two-pass step (:meth:`in_two_passes`) has compute
    #: the new moments again rather than read them from memory.
    codes_like_param: bool = True

    def decodes(self, stored: Any) -> bool:
        """Whether :meth:`load` rebuilds ``stored`` into a new array of the param's size (8-bit
        and 4-bit codes, factored rows and columns). The step then finishes such a leaf (its
        new stored moments) before it loads the next one, so that the decoded moments of one
        leaf at a time are alive, never a float32 copy of the whole state. By default: a
        stored form of more than one array."""
        return len(jax.tree.leaves(stored)) > 1

    def in_two_passes(self, stored: Any) -> bool:
        """Whether :meth:`store` reduces the whole new value before it encodes any element (an
        8-bit moment's block maxima), and does so in two parts, :meth:`store_scales` and
        :meth:`store_scaled`. By default ``False``.

        On a GPU the step then makes two passes over the leaf: the first computes the new
        moments for these reductions alone, the second computes them again and encodes them, so
        that no new or decoded moment of the leaf's size is written to memory (a GPU does not
        fuse a reduction with the elementwise work that reads its result)."""
        del stored
        return False

    def store_scales(self, value: Callable[[], jax.Array], stored: Any) -> Any:
        """The reductions of the new value that :meth:`store` computes first, for a ``stored``
        form :meth:`in_two_passes` accepts. ``value()`` gives the new value: call it once per
        reduction of another kind (a row's maximum, then a column's), so that a GPU computes
        the value inside each reduction's kernel, not once into memory."""
        raise NotImplementedError(f"{type(self).__name__} does not store in two passes")

    def store_scaled(self, value: jax.Array, stored: Any, scales: Any) -> Any:
        """:meth:`store` of ``value``, given the ``scales`` :meth:`store_scales` computed from
        it."""
        raise NotImplementedError(f"{type(self).__name__} does not store in two passes")

    def in_halves(self, stored: Any) -> bool:
        """Whether the codes of ``stored`` pair neighbours along the last axis (4-bit codes, two
        a byte) and :meth:`load_half` and :meth:`store_halves` take them a half at a time. By
        default ``False``.

        The kernel that writes such codes then computes the new moment in two halves, the
        elements of even and of odd index, each from its own half of every byte: elementwise
        in the codes' own shape, so that XLA:GPU writes the new codes over the old in place
        (through the pairing's reshapes it copies them first: a leaf-sized copy a moment)."""
        del stored
        return False

    def load_half(self, stored: Any, parity: int) -> jax.Array:
        """:meth:`load`'s elements of even (``parity=0``) or odd (``1``) index along the last
        axis. By default the loaded moment, sliced."""
        return self.load(stored)[..., parity::2]

    def store_halves(self, even: jax.Array, odd: jax.Array, stored: Any, scales: Any) -> Any:
        """:meth:`store_scaled` of the value whose elements of even and odd index along the last
        axis are ``even`` and ``odd``, for a ``stored`` form :meth:`in_halves` accepts."""
        raise NotImplementedError(f"{type(self).__name__} does not store in halves")

    def project(self, value: jax.Array, stored: Any) -> jax.Array:
        """The moment ``value`` as the step uses it: ``value`` itself by default (a storage that
        keeps every element, rounded or not, as bitsandbytes' 8-bit state does), and for a
        reducing storage what :meth:`load` will give after :meth:`store` (a block mean, a
        factored reconstruction), in any shape that broadcasts against the param."""
        del stored
        return value


def same_container(stored: Any, quantized: Any) -> Any:
    """``quantized`` (a NamedTuple) in the kind of container ``stored`` came in."""
    if isinstance(stored, tuple):
        return quantized
    # A container that rebuilt the stored form as a mapping of its fields (as
    # flax.nnx.Optimizer does with its state) gets the same kind of mapping back, so the state
    # keeps one structure from step to step (a lax.scan carry, donation).
    return type(stored)(quantized._asdict())


@dataclasses.dataclass(frozen=True)
class CastStorage(MomentStorage):
    """Stores a moment as a plain array of ``dtype`` (the param's own dtype when ``None``).

    Example:
      >>> import jax.numpy as jnp
      >>> from adam_jax import CastStorage
      >>> print(CastStorage(jnp.bfloat16).init(jnp.zeros(3, jnp.float32)).dtype)
      bfloat16
    """

    dtype: Any = None
    row_slices = True

    def init(self, param: Any) -> jax.Array:
        dtype = param.dtype if self.dtype is None else self.dtype
        if isinstance(param, jax.Array):
            return jnp.zeros_like(param, dtype=dtype)
        return jnp.zeros(param.shape, dtype, device=getattr(param, "sharding", None))

    def load(self, stored: jax.Array) -> jax.Array:
        return stored

    def store(self, value: jax.Array, stored: jax.Array) -> jax.Array:
        return value.astype(stored.dtype)


def cast_storage(dtype: Any = None) -> CastStorage:
    """Storage as a plain array of ``dtype`` (e.g. ``jnp.bfloat16`` halves the state).

    Args:
      dtype: the stored dtype, or ``None`` for the param's own.

    Returns:
      A :class:`CastStorage`.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.adam(1e-3, mu_dtype=adam_jax.cast_storage(jnp.bfloat16))
      >>> print(tx.init(jnp.zeros(4))[0].mu.dtype)
      bfloat16
    """
    return CastStorage(None if dtype is None else jnp.dtype(dtype))


def as_storage(spec: Any) -> MomentStorage:
    """Accepts ``None``, a dtype or a :class:`MomentStorage` (as ``mu_dtype`` / ``nu_dtype``)."""
    if isinstance(spec, MomentStorage):
        return spec
    try:
        return cast_storage(spec)
    except TypeError as error:
        raise ValueError(
            f"moment dtype must be None, a dtype or a MomentStorage, got {spec!r}"
        ) from error


def real_part_of(param: Any) -> Any:
    """``param`` itself, or a same-shaped real stand-in when it is complex (second moments are
    real)."""
    if jnp.issubdtype(param.dtype, jnp.complexfloating):
        dtype = jnp.finfo(param.dtype).dtype
        traced = isinstance(param, jax.core.Tracer)
        # An uncommitted param (the default device) gets an uncommitted moment: a committed one
        # would make the first jitted step's outputs committed, and the second call recompile.
        committed = not traced and getattr(param, "committed", True)
        sharding = getattr(param, "sharding", None) if committed else None
        return jax.ShapeDtypeStruct(param.shape, dtype, sharding=sharding)
    return param


@dataclasses.dataclass(frozen=True)
class PerLeafStorage:
    """A storage for each leaf, chosen from the tree: see :func:`per_leaf`."""

    select: Callable[[Any], Any]


def per_leaf(select: Callable[[Any], Any]) -> PerLeafStorage:
    """A moment storage chosen per leaf: ``select(tree)`` returns a tree of storage specs
    (``None`` is not a spec here: use :func:`cast_storage`) with the structure of ``tree``, or a
    prefix of it.

    ``select`` is called with the params in ``init`` and with the gradients in ``update``, so
    it must depend on the tree's structure, paths and shapes only (as Adam-mini's partition by
    layer names does), never on values. In place of each :class:`adam_jax.FlatParams` it sees
    the tree the buffers pack (``jax.ShapeDtypeStruct`` leaves with their paths and shapes),
    and the tensors of a buffer keep their own storages when these differ, reduce or are
    ``per_tensor`` (:class:`adam_jax.rules.SegmentedStorage`).

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> half_for_w = adam_jax.per_leaf(lambda p: {"w": adam_jax.cast_storage(jnp.bfloat16),
      ...                                           "b": adam_jax.cast_storage()})
      >>> tx = adam_jax.adam(1e-3, nu_dtype=half_for_w)
      >>> state = tx.init({"w": jnp.zeros(3), "b": jnp.zeros(2)})
      >>> print(state[0].nu["w"].dtype, state[0].nu["b"].dtype)
      bfloat16 float32
    """
    if not callable(select):
        raise ValueError(f"per_leaf takes a function of the params tree, got {select!r}")
    return PerLeafStorage(select)


def storages_for(spec: Any, tree: Any) -> list[MomentStorage]:
    """One storage per leaf of ``tree``: ``spec`` for all (``None``, a dtype or a
    :class:`MomentStorage`), or each leaf's from a :func:`per_leaf` spec."""
    count = len(jax.tree.leaves(tree))
    if not isinstance(spec, PerLeafStorage):
        return [as_storage(spec)] * count
    chosen = spec.select(tree)
    is_spec = lambda x: isinstance(x, MomentStorage)  # noqa: E731
    chosen_def: Any = jax.tree.structure(chosen, is_leaf=is_spec)
    try:
        subtrees = chosen_def.flatten_up_to(tree)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "per_leaf: the storages must have the params' structure (or a prefix of it): got "
            f"{chosen_def} for params {jax.tree.structure(tree)}"
        ) from error
    storages = []
    for choice, subtree in zip(jax.tree.leaves(chosen, is_leaf=is_spec), subtrees, strict=True):
        storages += [as_storage(choice)] * len(jax.tree.leaves(subtree))
    return storages
