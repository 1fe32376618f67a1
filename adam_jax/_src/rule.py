r"""The moment-rule core: one small abstraction from which every moment estimate is built.

A member of the Adam family differs from Adam in a few lines: which running averages it keeps,
which per-step scalars it needs (bias corrections, a clip value, a rectifier), and how one
parameter's update follows from its gradient and its averages. A :class:`MomentRule` states
exactly that, and :func:`scale_by_rule` turns it into an ``optax.GradientTransformation`` that
brings everything else:

* **compute dtype**: each leaf's gradient is promoted to at least float32, moments are loaded
  into that dtype (their real counterpart for ``real`` moments) and the update comes back in the
  gradient's dtype;
* **storage**: each :class:`Moment` is kept by its :class:`adam_jax.MomentStorage` (the params'
  dtype, bfloat16, 8-bit blocks...), which also places it like its param, so sharded params
  (Explicit and Auto meshes) get sharded moments and ZeRO-1 (``adam_jax.sharding``) applies;
* **complex params**: ``real`` moments (second moments) are real arrays;
* **per-tensor reductions** that stay per tensor on :class:`adam_jax.FlatParams` buffers
  (:meth:`Leaf.sum`, :meth:`Leaf.mean`), and so do reduced and shape-aware moment storages
  (block means, factored, 4-bit rank-1: :class:`adam_jax.rules.SegmentedStorage`);
* **decoupled weight decay** inside the rule, for rules whose decay term must be scaled or
  skipped with the update (``weight_decay`` and ``mask`` of :func:`scale_by_rule`);
* **states built by field name**: the rule's ``state_type`` (an optax state type where optax has
  the optimizer, so that checkpoints move between the two) is filled from named scalar fields
  (step counts) and named moment trees, in whatever order the type declares them.

A rule is a frozen dataclass holding its hyperparameters; its methods run while ``jax.jit``
traces the update, so they must be pure functions of their arguments.

Example: RMSProp with bias correction written as a rule.

  >>> import dataclasses, adam_jax, jax.numpy as jnp, optax
  >>> @dataclasses.dataclass(frozen=True)
  ... class RMSRule(adam_jax.rules.MomentRule):
  ...     decay: float = 0.9
  ...     state_type = optax.ScaleByRmsState
  ...     def moments(self):
  ...         return (adam_jax.rules.Moment("nu", real=True),)
  ...     def init_fields(self, params):
  ...         return {}  # ScaleByRmsState keeps no step count
  ...     def next_fields(self, fields):
  ...         return {}
  ...     def scalars(self, fields, dtype):
  ...         return 1 - self.decay
  ...     def update(self, g, moments, weight, leaf):
  ...         nu = moments["nu"] + weight * (jnp.square(g) - moments["nu"])
  ...         return g / (jnp.sqrt(nu) + 1e-8), {"nu": nu}
  >>> tx = adam_jax.rules.scale_by_rule(RMSRule())
  >>> updates, state = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
  >>> print(jnp.round(updates, 4), state.nu)
  [3.1623] [0.4]
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adam_jax._src import hyperparams, validation
from adam_jax._src.elementwise import is_elementwise
from adam_jax._src.leaf_schedule import LeafSchedule, LeafStep, WholeLeaves
from adam_jax._src.numerics import compute_dtype, real_dtype
from adam_jax._src.segmented import buffer_storages, packed_tensors
from adam_jax._src.sequencing import after, behind_barrier, in_turn
from adam_jax._src.storage import (
    MomentStorage,
    PerLeafStorage,
    as_storage,
    real_part_of,
)
from adam_jax._src.typed_sharding import placement_for_shape, reshard, typed_sharding


@dataclasses.dataclass(frozen=True)
class Moment:
    """One per-parameter tree of a rule's state.

    Attributes:
      name: the field of the state type that holds the tree.
      storage: how the moment is stored between steps: ``None`` (the param's dtype), a dtype, a
        :class:`adam_jax.MomentStorage`, or one per leaf (:func:`adam_jax.per_leaf`).
      real: the moment is real for complex params (a second moment, an average of ``|g|^2``).
      from_params: starts as a copy of the params instead of zeros (schedule-free's ``z``).
      cast: loaded in the leaf's compute dtype; ``False``: as stored, for integer state of a
        leaf (SPAM's sampled entries).
    """

    name: str
    storage: Any = None
    real: bool = False
    from_params: bool = False
    cast: bool = True

    def storages(self, tree: Any) -> list[MomentStorage]:
        """The storage of each leaf of ``tree`` (the params, or the gradients); a buffer of
        :class:`adam_jax.FlatParams` whose tensors need their own (reducing or ``per_tensor``
        storages) gets a :class:`adam_jax.rules.SegmentedStorage` of them."""
        return buffer_storages(self.storage, tree)


def second_moment(storage: Any = None, name: str = "nu") -> Moment:
    """A second moment (an average of :math:`|g|^2`): a real :class:`Moment` for complex params.

    Args:
      storage: ``None`` (the param's real dtype), a dtype or a :class:`MomentStorage`.
      name: the state field that holds it.
    """
    return Moment(name, storage, real=True)


class Leaf:
    """What a rule's :meth:`MomentRule.update` knows about the leaf it updates besides its
    gradient and moments.

    Attributes:
      param: the param leaf in the compute dtype, or ``None`` when ``update`` got no params.
      decay: the decoupled weight-decay rate of this leaf at this step (``0.0`` where the rule
        has no decay or the mask leaves the leaf out).
      position: the leaf's place among the flattened updates (``None`` outside
        :func:`scale_by_rule`), so that a rule can draw random numbers of its own per leaf.
    """

    __slots__ = ("_layout", "_segments", "_settled", "_stored", "decay", "param", "position")

    def __init__(
        self,
        *,
        param: jax.Array | None,
        decay: Any,
        segments: tuple[int, ...] | None = None,
        stored: dict[str, tuple[MomentStorage, Any]] | None = None,
        layout: Any = None,
        position: int | None = None,
    ):
        self.param = param
        self.decay = decay
        self.position = position
        self._segments = segments
        self._stored = stored or {}
        self._layout = layout
        self._settled: set[str] = set()

    def settle(self, name: str, value: jax.Array) -> jax.Array:
        """Moment ``name``'s new ``value`` as its storage will keep it, for the step to use.

        Unchanged for storages that keep every element (the default, bfloat16, 8-bit); for a
        reducing storage (block means as in Adam-mini, factored rows and columns as in
        Adafactor) the block mean or the reconstruction, which may be of a shape that
        broadcasts against the param. A rule calls it on each moment whose new value its step
        uses; the core refuses a reducing storage for a moment the rule does not settle.
        """
        self._settled.add(name)
        if name not in self._stored:
            return value
        storage, stored = self._stored[name]
        return _laid_out(storage.project(value, stored).astype(value.dtype), self._layout)

    def sum(self, x: jax.Array, dtype: Any = None) -> jax.Array:
        """The sum of ``x`` over each tensor, broadcastable against ``x``, accumulated in
        ``dtype`` (``None``: ``x``'s, as ``jnp.sum``).

        A scalar for an ordinary leaf; for a buffer of :class:`adam_jax.FlatParams`, the sum
        over each packed tensor, repeated over that tensor's elements, so per-tensor rules
        (trust ratios, update clipping) give the same results on flat params as on the tree.
        """
        if self._segments is None:
            return jnp.sum(x, dtype=dtype)
        return _per_segment(x if dtype is None else x.astype(dtype), self._segments, mean=False)

    def mean(self, x: jax.Array, dtype: Any = None) -> jax.Array:
        """The mean of ``x`` over each tensor, broadcastable against ``x`` (see :meth:`sum`)."""
        if self._segments is None:
            return jnp.mean(x, dtype=dtype)
        return _per_segment(x if dtype is None else x.astype(dtype), self._segments, mean=True)

    def max(self, x: jax.Array) -> jax.Array:
        """The maximum of the real ``x`` over each tensor, broadcastable against ``x`` (see
        :meth:`sum`)."""
        if self._segments is None:
            return jnp.max(x)
        ids = np.repeat(np.arange(len(self._segments)), self._segments)
        maxima = jax.ops.segment_max(
            x, ids, num_segments=len(self._segments), indices_are_sorted=True
        )
        sizes = np.asarray(self._segments)
        return jnp.repeat(maxima, sizes, total_repeat_length=x.shape[0])

    def add_decay(self, update: jax.Array) -> jax.Array:
        """``update + decay * param``: decoupled weight decay (nothing when the rate is 0)."""
        if validation.static_float(self.decay) == 0.0:
            return update
        if self.param is None:
            raise ValueError("weight decay needs params: call update(updates, state, params)")
        return update + self.decay * self.param.astype(update.dtype)


def _per_segment(x: jax.Array, sizes: tuple[int, ...], mean: bool) -> jax.Array:
    """Per-segment sums (or means) of the 1-D ``x``, repeated over each segment."""
    ids = np.repeat(np.arange(len(sizes)), sizes)
    totals = jax.ops.segment_sum(x, ids, num_segments=len(sizes), indices_are_sorted=True)
    if mean:
        totals = totals / np.maximum(np.asarray(sizes), 1).astype(totals.dtype)
    return jnp.repeat(totals, np.asarray(sizes), total_repeat_length=x.shape[0])


class MomentRule(abc.ABC):
    """A moment estimate of the Adam family: its state, per-step scalars and per-leaf update.

    Subclass it (a frozen dataclass whose fields are the hyperparameters) and pass an instance
    to :func:`scale_by_rule`. Set the class attribute ``state_type`` to a ``NamedTuple`` whose
    fields are the rule's scalar fields (:meth:`init_fields`) and its moments
    (:meth:`moments`), in any order.
    """

    state_type: Any
    #: Whether :meth:`update` reads ``leaf.param`` (besides weight decay, which always does).
    uses_params: bool = False
    #: Whether a GPU may step a leaf in two passes where its storages ask for it
    #: (:meth:`MomentStorage.in_two_passes`): the second pass traces :meth:`update` again. False
    #: for a rule whose update is dear to compute twice or records what it traces (SOAP's, which
    #: batches its solver calls across leaves).
    two_passes: bool = True

    def __post_init__(self) -> None:
        """Checks the hyperparameters (:func:`adam_jax.rules.hyperparam` fields) when the rule
        is built; a rule with checks across fields extends it."""
        hyperparams.check_fields(self)

    def rate(self, fields: dict[str, Any], dtype: Any) -> jax.Array:
        """The learning rate of this step in ``dtype``, for a rule whose rate lives inside its
        update (a ``learning_rate`` field, see :func:`adam_jax.rules.learning_rate`): the field, or
        its schedule at :meth:`step_index`; 1 where the field is ``None`` (the update is the
        direction)."""
        rate = getattr(self, "learning_rate", None)
        if rate is None:
            return jnp.ones([], dtype)
        return jnp.asarray(rate(self.step_index(fields)) if callable(rate) else rate).astype(dtype)

    @abc.abstractmethod
    def moments(self) -> tuple[Moment, ...]:
        """The per-parameter trees the state keeps."""

    def init_fields(self, params: Any) -> dict[str, Any]:
        """The scalar fields of the initial state (default: ``count``, an int32 zero)."""
        del params
        return {"count": jnp.zeros([], jnp.int32)}

    def next_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The scalar fields after a step (default: ``count`` incremented, saturating)."""
        return {**fields, "count": optax.safe_increment(fields["count"])}

    def step_index(self, fields: dict[str, Any]) -> Any:
        """The 0-based index of this step, at which a weight-decay schedule is evaluated
        (default: ``count`` before the step, as ``add_decayed_weights`` counts)."""
        return fields["count"]

    @abc.abstractmethod
    def scalars(self, fields: dict[str, Any], dtype: Any) -> Any:
        """Per-step scalars in the real dtype ``dtype``, from the scalar fields before the step.

        Called once per real compute dtype of the leaves while tracing (a tree of a thousand
        float32 leaves computes them once), and passed to every :meth:`update`.
        """

    @abc.abstractmethod
    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: Any, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One leaf's update and new moments.

        Args:
          g: the gradient in its compute dtype (at least float32; complex for complex params).
          moments: the loaded moments by name, in the compute dtype (real ones in its real
            counterpart).
          scalars: what :meth:`scalars` returned for this leaf's real dtype.
          leaf: the param, the decay rate and per-tensor reductions (:class:`Leaf`).

        Returns:
          ``(update, new_moments)``: the update (cast back to the gradient's dtype by the
          core) and every moment by name.
        """

    def step_leaf(
        self,
        arithmetic: Callable[[list[Any]], tuple[jax.Array, list[Any]]],
        stored: list[Any],
        storages: list[MomentStorage],
        grad: jax.Array,
        scalars_for: Callable[[Any], Any],
    ) -> tuple[jax.Array, list[Any]]:
        """One leaf's update and new stored moments from its ``stored`` moments (one tree per
        moment, kept by ``storages``): ``arithmetic(stored)``, the core's (load, :meth:`update`,
        store). A rule overrides it to step some leaves its own way (Adam's rule: the fused
        8-bit kernel); ``scalars_for(dtype)`` gives the step scalars the core computed."""
        del storages, grad, scalars_for
        return arithmetic(stored)

    def to_state(self, fields: dict[str, Any]) -> Any:
        """The state from its scalar fields and moment trees, by name."""
        return self.state_type(**fields)

    def from_state(self, state: Any) -> dict[str, Any]:
        """The scalar fields and moment trees of a state, by name (inverse of
        :meth:`to_state`)."""
        return state._asdict()


def expand_mask(mask: Any, params: Any) -> list[bool]:
    """The mask (a tree of bools, a prefix of one, or a callable of the params) as one bool per
    leaf of ``params``."""
    tree = mask(params) if callable(mask) else mask
    try:
        full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), tree, params)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "mask must have the structure of the params (or a prefix of it): got mask "
            f"{jax.tree.structure(tree)} for params {jax.tree.structure(params)}"
        ) from error
    return [bool(m) for m in jax.tree.leaves(full)]


def tensor_segments(updates: Any) -> list[tuple[int, ...] | None]:
    """For each leaf of ``updates``: the sizes of the tensors packed in it when it is a buffer
    of :class:`adam_jax.FlatParams`, else ``None``."""
    return [
        None if shapes is None else tuple(int(np.prod(s, dtype=np.int64)) for s in shapes)
        for shapes in packed_tensors(updates)
    ]


def map_tensors(fn: Callable[..., jax.Array], tree: Any, *rest: Any) -> Any:
    """``fn(x, *ys, leaf)`` for each leaf ``x`` of ``tree`` and the leaves ``ys`` of ``rest`` at
    its place, with a :class:`Leaf` whose :meth:`Leaf.sum` and :meth:`Leaf.mean` stay per
    tensor on :class:`adam_jax.FlatParams`; the results in ``tree``'s structure. For
    transformations outside a rule that work per tensor (trust ratios, caution)."""
    treedef: Any = jax.tree.structure(tree)  # its methods are untyped in jax's stubs
    others = [treedef.flatten_up_to(other) for other in rest]
    results = [
        fn(x, *ys, Leaf(param=None, decay=0.0, segments=segments))
        for x, segments, *ys in zip(
            treedef.flatten_up_to(tree), tensor_segments(tree), *others, strict=True
        )
    ]
    return treedef.unflatten(results)


def _layout(g: jax.Array, loaded: dict[str, jax.Array], reducing: dict[str, Any]) -> Any:
    """The typed sharding that a leaf's full-shape operands share: a full moment's (ZeRO-1
    shards the state, not the gradient), else the gradient's; None off Explicit meshes."""
    for name, value in loaded.items():
        if name not in reducing and value.shape == g.shape and typed_sharding(value) is not None:
            return typed_sharding(value)
    return typed_sharding(g)


def _laid_out(value: jax.Array, layout: Any) -> jax.Array:
    """A reduced moment (block means, factors) laid out as ``layout`` allows its shape, so that
    it broadcasts against the full-shape operands (ZeRO-1 may have put the data axis on another
    dimension of the small stored array)."""
    return reshard(value, placement_for_shape(layout, value.shape))


def _as_array(param: Any) -> Any:
    """Python numbers become arrays (optax accepts them as params); arrays and
    ``ShapeDtypeStruct`` s pass through."""
    return param if hasattr(param, "dtype") else jnp.asarray(param)


def _init_moment(moment: Moment, params: Any) -> Any:
    """A moment's initial state, stored leaf by leaf; a leaf its storage cannot keep is named
    in the error."""
    with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
    stored = []
    for storage, (path, p) in zip(moment.storages(params), with_paths, strict=True):
        try:
            if moment.from_params:
                # Outside jit the param is copied: the state must not alias a donated param.
                stored.append(storage.store(jnp.array(p), storage.init(p)))
            else:
                stored.append(storage.init(real_part_of(p) if moment.real else p))
        except ValueError as error:
            leaf = jax.tree_util.keystr(path) or "(the params)"
            raise ValueError(f"moment {moment.name!r} of leaf {leaf}: {error}") from error
    treedef: Any = jax.tree.structure(params)  # its methods are untyped in jax's stubs
    return treedef.unflatten(stored)


def _update_leaf(
    rule: MomentRule,
    moments: tuple[Moment, ...],
    storages: list[MomentStorage],
    scalars_for: Callable[[Any], Any],
    trees: list[Any],
    *,
    grad: jax.Array,
    param: Any,
    decay: Any,
    segments: tuple[int, ...] | None,
    position: int,
    wait_for: Any = None,
    two_passes: bool = True,
) -> tuple[jax.Array, list[Any]]:
    """One leaf's step (a :data:`adam_jax._src.leaf_schedule.LeafRun`): its stored moments
    ``trees`` used once the arrays of ``wait_for`` exist, then the rule's
    :meth:`MomentRule.step_leaf` of :func:`_arithmetic` (in two passes on a GPU where the
    storages ask for it and ``two_passes`` allows it)."""
    two_passes = two_passes and rule.two_passes and _in_two_passes(storages, trees)
    if wait_for is not None and two_passes:
        # Stepped in two passes on a GPU, the leaf holds no decoded moment there: nothing to
        # keep apart from the previous leaf's.
        trees = jax.lax.platform_dependent(
            trees,
            cpu=functools.partial(after, wait_for),
            tpu=functools.partial(behind_barrier, wait_for),
            default=lambda trees: trees,
        )
    else:
        trees = in_turn(wait_for, trees)
    arithmetic = functools.partial(
        _arithmetic, rule, moments, storages, scalars_for, grad=grad, param=param, decay=decay,
        segments=segments, position=position, two_passes=two_passes,
    )  # fmt: skip
    return rule.step_leaf(arithmetic, trees, storages, grad, scalars_for)


def _arithmetic(
    rule: MomentRule,
    moments: tuple[Moment, ...],
    storages: list[MomentStorage],
    scalars_for: Callable[[Any], Any],
    trees: list[Any],
    *,
    grad: jax.Array,
    param: Any,
    decay: Any,
    segments: tuple[int, ...] | None,
    position: int,
    two_passes: bool = False,
) -> tuple[jax.Array, list[Any]]:
    """One leaf's moments loaded (a reduced one laid out to broadcast against the param), the
    rule's update in the compute dtype, the new moments stored: on a GPU, in two passes where
    ``two_passes`` says so (:meth:`MomentStorage.in_two_passes`)."""

    def step(
        grad: jax.Array, trees: list[Any], parity: int | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        # With a parity, of the elements of that parity along the last axis alone (grad is
        # theirs already): the halves of MomentStorage.in_halves.
        g = grad.astype(compute_dtype(grad.dtype))
        rdtype = real_dtype(g.dtype)
        kept = list(zip(moments, storages, trees, strict=True))

        def load(s: MomentStorage, t: Any) -> jax.Array:
            return s.load(t) if parity is None else s.load_half(t, parity)

        # A storage may load a tree of arrays (SOAP's factors of a stack, by dimension).
        loaded = {
            m.name: jax.tree.map(lambda x, m=m: x.astype(rdtype if m.real else g.dtype), load(s, t))
            if m.cast
            else load(s, t)
            for m, s, t in kept
        }
        reducing = {m.name: (s, t) for m, s, t in kept if s.reduces}
        layout = _layout(g, loaded, reducing) if reducing else None
        for name in reducing:
            loaded[name] = _laid_out(loaded[name], layout)
        half = param if param is None or parity is None else param[..., parity::2]
        leaf = Leaf(
            param=None if half is None else half.astype(g.dtype),
            decay=decay,
            segments=segments,
            stored=reducing,
            layout=layout,
            position=position,
        )
        update, new = rule.update(g, loaded, scalars_for(rdtype), leaf)
        unsettled = sorted(set(reducing) - leaf._settled)
        if unsettled:
            raise ValueError(
                f"{type(rule).__name__} does not settle moment {unsettled[0]!r} "
                f"(Leaf.settle), so it cannot keep it in the reducing storage "
                f"{type(reducing[unsettled[0]][0]).__name__}"
            )
        return update.astype(grad.dtype), new

    kept = list(zip(moments, storages, trees, strict=True))
    update, new = step(grad, trees)
    if not any(s.decodes(t) and not s.reduces for _, s, t in kept):
        return update, [s.store(new[m.name], t) for m, s, t in kept]

    def on_cpu(update: jax.Array, new: dict[str, jax.Array]) -> tuple[jax.Array, list[Any]]:
        # On CPU, codes of the param's size (8-bit, 4-bit) are encoded once the update exists,
        # so that no later fusion decodes the old codes again (to recompute the update where
        # the params take it) after the new ones overwrite them: else XLA:CPU copies every
        # such leaf's old codes before the step and decodes each leaf two or three times
        # (docs/memory.md, "What the figures show").
        new = after(update, new)
        return update, [s.store(new[m.name], t) for m, s, t in kept]

    def in_one_pass(update: jax.Array, new: dict[str, jax.Array]) -> tuple[jax.Array, list[Any]]:
        return update, [s.store(new[m.name], t) for m, s, t in kept]

    def afresh(
        grad: jax.Array, trees: list[Any], number: int, parity: int | None = None
    ) -> dict[str, jax.Array]:
        # The new moments computed again behind a barrier of their own (numbered: XLA merges
        # barriers of the same operands), which XLA then fuses into the kernels that read them
        # rather than writing one computation to memory for several; with a parity, those of
        # its elements along the last axis alone.
        again, stored, _ = jax.lax.optimization_barrier((grad, trees, number))
        return step(again if parity is None else again[..., parity::2], stored, parity)[1]

    def first_pass(new: dict[str, jax.Array], name: str) -> Callable[[], jax.Array]:
        calls = itertools.count()

        def value() -> jax.Array:
            number = next(calls)
            return new[name] if number == 0 else afresh(grad, trees, number)[name]

        return value

    def in_two_passes(update: jax.Array, new: dict[str, jax.Array]) -> tuple[jax.Array, list[Any]]:
        # The first pass's new moments feed the scales alone; the barrier keeps XLA from reusing
        # them, so the second pass computes them again inside the kernel that encodes them and
        # takes the update (MomentStorage.in_two_passes). Each moment's first computation for
        # its scales is the same for all (one kernel for reductions of one kind); a later one
        # (a reduction of another kind, as a column's maximum after a row's) is its own.
        del update
        scales = [
            s.store_scales(first_pass(new, m.name), t) if s.in_two_passes(t) else None
            for m, s, t in kept
        ]
        again, stored, scales = jax.lax.optimization_barrier((grad, trees, scales))
        update, new = step(again, stored)
        halves: list[dict[str, jax.Array]] = []
        if in_halves:
            # Codes two a byte, computed a half of each byte at a time, so that XLA:GPU writes
            # them over the old ones in place.
            halves = [afresh(again, stored, 0, parity) for parity in (0, 1)]
        elif not all(s.codes_like_param for s in storages):
            # Codes of another shape than the param's (4-bit, two a byte) are not written by
            # the param's kernel: theirs computes the moments again.
            packed = afresh(again, stored, 0)
            new = {m.name: (new if s.codes_like_param else packed)[m.name] for m, s, _ in kept}
        return update, [
            s.store_halves(halves[0][m.name], halves[1][m.name], t, scale)
            if halves and s.in_halves(t)
            else s.store_scaled(new[m.name], t, scale)
            if scale is not None
            else s.store(new[m.name], t)
            for (m, s, t), scale in zip(kept, scales, strict=True)
        ]

    in_halves = (
        two_passes
        and segments is None
        and typed_sharding(grad) is None
        and not any(s.reduces for s in storages)
        and any(s.in_halves(t) for s, t in zip(storages, trees, strict=True))
        and all(s.in_halves(t) or s.codes_like_param for s, t in zip(storages, trees, strict=True))
        and all(m.cast for m in moments)
        and _update_elementwise(
            rule, moments, grad, scalars_for(real_dtype(compute_dtype(grad.dtype))), param,
            decay, position,
        )
    )  # fmt: skip
    # A TPU keeps one pass: there the two passes' kernels move more bytes, not fewer (GPT-2
    # small on a v5p, the bytes its kernels read and write: 8-bit 20.8 GB in one pass against
    # 25.5 in two, 4-bit 18.9 against 34.9; on an H100, 4.0 against 2.9 and 5.0 against 4.5).
    on_gpu = in_two_passes if two_passes else in_one_pass
    result: tuple[jax.Array, list[Any]] = jax.lax.platform_dependent(
        update, new, cpu=on_cpu, tpu=in_one_pass, default=on_gpu
    )
    return result


def _in_two_passes(storages: list[MomentStorage], trees: list[Any]) -> bool:
    """Whether a leaf is stepped in two passes on a GPU: every stored moment that decodes
    is stored in two passes (:meth:`MomentStorage.in_two_passes`)."""
    decoding = [(s, t) for s, t in zip(storages, trees, strict=True) if s.decodes(t)]
    return bool(decoding) and all(s.in_two_passes(t) for s, t in decoding)


def _row_elementwise(
    rule: MomentRule,
    moments: tuple[Moment, ...],
    storages: list[MomentStorage],
    trees: list[Any],
    grad: jax.Array,
    scalars: Any,
    param: Any,
    decay: Any,
    position: int,
    segments: tuple[int, ...] | None,
) -> bool:
    """Whether a leaf's step could run on slices of its rows with the same results: its
    storages keep rows apart, it is one tensor (not a buffer of flat params), it is not sharded
    (seen on Explicit meshes only: a slice would cut its shards), and ``rule.update`` computes
    each element from that element's gradient, moments and param alone (no per-tensor sum, no
    random numbers)."""
    if (
        not grad.ndim
        or segments is not None
        or not all(s.row_slices for s in storages)
        or not all(m.cast for m in moments)
        or any(typed_sharding(x) is not None for x in jax.tree.leaves((grad, trees)))
    ):
        return False
    return _update_elementwise(rule, moments, grad, scalars, param, decay, position)


def _update_elementwise(
    rule: MomentRule,
    moments: tuple[Moment, ...],
    grad: jax.Array,
    scalars: Any,
    param: Any,
    decay: Any,
    position: int,
) -> bool:
    """Whether ``rule.update`` of a leaf like ``grad`` computes each element from that
    element's gradient, moments and param alone (no per-tensor sum, no random numbers)."""
    g = jax.ShapeDtypeStruct(grad.shape, compute_dtype(grad.dtype))
    rdtype = real_dtype(g.dtype)
    loaded = {m.name: jax.ShapeDtypeStruct(g.shape, rdtype if m.real else g.dtype) for m in moments}
    p = None if param is None else jax.ShapeDtypeStruct(grad.shape, param.dtype)

    def update(g: jax.Array, loaded: dict[str, jax.Array], p: Any) -> Any:
        leaf = Leaf(param=None if p is None else p.astype(g.dtype), decay=decay, position=position)
        return rule.update(g, loaded, scalars, leaf)

    return is_elementwise(update, grad.shape, g, loaded, p)


def scale_by_rule(
    rule: MomentRule,
    *,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """The gradient transformation of a :class:`MomentRule`.

    Args:
      rule: the rule.
      weight_decay: decoupled weight decay handed to the rule as :attr:`Leaf.decay` (a
        constant >= 0, or a schedule of :meth:`MomentRule.step_index`); only for rules that
        apply it (their ``update`` calls :meth:`Leaf.add_decay` or scales ``leaf.decay``).
      mask: which leaves to decay: a tree of bools with the params' structure (or a prefix of
        it), or a callable returning one from the params.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is ``rule.state_type``. Its
      ``update`` takes the extra argument ``leaf_schedule``, a
      :class:`adam_jax.rules.LeafSchedule` that runs each leaf's step (default: each leaf
      whole, in turn); the wrappers that need one (:func:`adam_jax.step_in_slices`,
      :func:`adam_jax.offload_state`) hand it through optax's extra arguments, and other extra
      arguments are ignored.
    """
    scheduled = callable(weight_decay)
    if not scheduled:
        validation.check_non_negative("weight_decay", weight_decay)
    no_decay = not scheduled and validation.static_float(weight_decay) == 0.0
    moments = rule.moments()
    for moment in moments:
        # A storage spec that is not one fails here, not in init.
        if not isinstance(moment.storage, PerLeafStorage):
            as_storage(moment.storage)

    def init_fn(params: optax.Params) -> Any:
        params = jax.tree.map(_as_array, params)
        fields = dict(rule.init_fields(params))
        for moment in moments:
            fields[moment.name] = _init_moment(moment, params)
        return rule.to_state(fields)

    def param_leaves_of(treedef: Any, params: Any, count: int) -> list[Any]:
        if no_decay and not rule.uses_params:
            return [None] * count
        if params is None:
            raise ValueError(
                f"{type(rule).__name__} needs params: call update(updates, state, params)"
            )
        return [_as_array(p) for p in treedef.flatten_up_to(params)]

    def decays_of(scalar_fields: dict[str, Any], params: Any, count: int) -> list[Any]:
        if no_decay:
            return [0.0] * count
        rate = weight_decay(rule.step_index(scalar_fields)) if scheduled else weight_decay
        keep = [True] * count if mask is None else expand_mask(mask, params)
        return [rate if k else 0.0 for k in keep]

    def update_fn(
        updates: optax.Updates,
        state: Any,
        params: optax.Params | None = None,
        *,
        leaf_schedule: LeafSchedule | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, Any]:
        del extra_args  # for the transformations beside this one in a chain
        schedule = WholeLeaves() if leaf_schedule is None else leaf_schedule
        fields = rule.from_state(state)
        scalar_fields = {k: v for k, v in fields.items() if k not in {m.name for m in moments}}
        # One set of step scalars per compute dtype, built on first use.
        scalars_for = functools.cache(functools.partial(rule.scalars, scalar_fields))

        treedef: Any = jax.tree.structure(updates)  # its methods are untyped in jax's stubs
        grads = [jnp.asarray(g) for g in treedef.flatten_up_to(updates)]
        param_leaves = param_leaves_of(treedef, params, len(grads))
        decays = decays_of(scalar_fields, params, len(grads))
        segments = tensor_segments(updates)
        stored = [treedef.flatten_up_to(fields[m.name]) for m in moments]
        storages = [m.storages(updates) for m in moments]

        stepped: dict[int, tuple[Any, list[Any]]] = {}
        carry: Any = None
        for i in schedule.order(len(grads)):
            grad = grads[i]
            kept = [leaf_storages[i] for leaf_storages in storages]
            trees = [tree[i] for tree in stored]
            # Built here, not while a schedule traces the step on its own.
            scalars = scalars_for(real_dtype(compute_dtype(grad.dtype)))
            leaf = LeafStep(
                run=functools.partial(
                    _update_leaf, rule, moments, kept, scalars_for, decay=decays[i],
                    segments=segments[i], position=i,
                ),
                stored=trees,
                grad=grad,
                param=param_leaves[i],
                position=i,
                decoded=tuple(s.decodes(t) for s, t in zip(kept, trees, strict=True)),
                reduces=any(s.reduces for s in kept),
                row_elementwise=functools.partial(
                    _row_elementwise, rule, moments, kept, trees, grad, scalars,
                    param_leaves[i], decays[i], i, segments[i],
                ),
            )  # fmt: skip
            update, new_stored, carry = schedule.step(leaf, carry)
            stepped[i] = update, new_stored

        new_updates = [stepped[i][0] for i in range(len(grads))]
        new_fields = dict(rule.next_fields(scalar_fields))
        for k, m in enumerate(moments):
            new_fields[m.name] = treedef.unflatten([stepped[i][1][k] for i in range(len(grads))])
        return treedef.unflatten(new_updates), rule.to_state(new_fields)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
