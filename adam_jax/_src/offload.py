r"""Optimizer state in host memory.

An optimizer's state (two moments per parameter for Adam) is twice the params; on an
accelerator it is often what keeps a model from fitting. :func:`offload_state` keeps it in the
host's memory (JAX's ``pinned_host`` memory kind) between steps: during the forward and
backward passes the device holds none of it but its small arrays (under ``min_offloaded_size``
entries each: a norm's or a bias's moments, the step count, 8-bit scales), and the update
brings it over, steps it and sends it back, inside the same compiled program. A small array
stays because each array is a transfer of its own each way, whose fixed cost outweighs its
bytes: GPT-2 small's 98 norms and biases made two thirds of the 594 copies of its step.

Leaf by leaf: XLA places the copies between memories where its scheduler likes, and on a GPU it
brings every leaf's state over before the first leaf is stepped, so that the device holds the
whole state at once. The core (:func:`adam_jax.rules.scale_by_rule`, the rules of the registry)
moves its own moments in turn instead: :func:`offload_state` hands the rules inside it a leaf
schedule (:class:`_Offload`, through optax's extra argument ``leaf_schedule``), which brings a
leaf's host state over only once the previous leaf's new state is back in host memory and its
update computed (``jax.lax.optimization_barrier`` joins them), so that whatever order XLA picks
the device holds one leaf's state at a time. Within a leaf, a moment computed from its own old
value alone (Adam's ``mu``) comes over and goes back before the next: the device holds a
moment's old and new arrays and the new ones before it, 1.5x the leaf's state for Adam, not 2x.
The schedule keeps, for the one update it serves, each array it copied to the device with its
host original, and each new array the core copied back with that copy. The core returns its new
moments typed as device arrays, so that whatever combines them with the old state
(``optax.apply_if_finite``'s ``lax.cond``) sees one memory, and :func:`offload_state` takes the
host copy already made instead of copying again. The copies it made of the state up front and
that nothing read are dropped by JAX.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.extend.core import ClosedJaxpr, DropVar, Jaxpr, Literal, jaxpr_as_fun
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from adam_jax._src.leaf_schedule import LeafSchedule, LeafStep, WholeLeaves

HOST = "pinned_host"


@dataclasses.dataclass
class _Transfers:
    """What :func:`offload_state`'s update and its schedule record while one update traces: by
    ``id`` of a device array (kept, so that its id is not reused meanwhile), the host array it
    was copied from (``originals``) or the host copy the schedule made of it (``copies``)."""

    originals: dict[int, tuple[Any, Any]]
    min_size: int
    copies: dict[int, tuple[Any, Any]] = dataclasses.field(default_factory=dict)

    def goes_to_host(self, shape: tuple[int, ...]) -> bool:
        """Whether an array of the state of this ``shape`` is kept in host memory."""
        return _offloaded(shape, self.min_size)


def _offloaded(shape: tuple[int, ...], min_size: int) -> bool:
    """Whether :func:`offload_state` keeps an array of ``shape`` in host memory: whether it has
    at least ``min_size`` entries."""
    return math.prod(shape) >= min_size


def _in_space(leaf: Any, space: Any) -> bool:
    """Whether ``leaf`` is known to be in memory ``space``. A concrete array says so by its
    sharding; a traced one by its type, where only a ``device_put`` inside the trace sets the
    space: an argument in host memory is typed as device memory, so it always moves."""
    if isinstance(leaf, jax.core.Tracer):
        return space == jax.memory.Space.Host and jax.typeof(leaf).memory_space == space
    kind = getattr(leaf.sharding, "memory_kind", None)
    return (kind == HOST) == (space == jax.memory.Space.Host)


def _place(tree: Any, space: Any, min_size: int = 0) -> Any:
    """``tree``'s arrays of at least ``min_size`` entries in the memory ``space``; an array
    known to be there, or smaller, stays as it is."""

    def place(leaf: Any) -> Any:
        if (
            not isinstance(leaf, jax.Array)
            or not _offloaded(leaf.shape, min_size)
            or _in_space(leaf, space)
        ):
            return leaf
        return jax.device_put(leaf, space)

    return jax.tree.map(place, tree)


def _home(params: Any) -> jax.sharding.Sharding | None:
    """Where an array of the state that is not laid out like a param goes (a scalar count, or
    any array ``init`` makes afresh, which JAX leaves uncommitted on the default device):
    replicated on the params' mesh, or on their one device where they are committed to it, in
    host memory. ``None`` where the params say nothing (uncommitted, or traced: under ``jit``
    the compiled program places its outputs on its own devices)."""
    for leaf in jax.tree.leaves(params):
        if isinstance(leaf, jax.core.Tracer):
            return None
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
            return NamedSharding(sharding.mesh, PartitionSpec(), memory_kind=HOST)
        if isinstance(sharding, SingleDeviceSharding) and getattr(leaf, "committed", False):
            (device,) = sharding.device_set
            return SingleDeviceSharding(device, memory_kind=HOST)
    return None


def _to_host(state: Any, params: Any, min_size: int) -> Any:
    """``state``'s arrays of at least ``min_size`` entries in host memory: those on the params'
    devices in their own layouts, the others (committed to one device as they go to its host
    memory) on the params' home. The smaller ones stay as they are."""
    home = _home(params)

    def place(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array) or not _offloaded(leaf.shape, min_size):
            return leaf
        if (
            home is not None
            and not isinstance(leaf, jax.core.Tracer)
            and leaf.sharding.device_set != home.device_set
        ):
            return jax.device_put(leaf, home)
        return _place(leaf, jax.memory.Space.Host)

    return jax.tree.map(place, state)


def on_device(x: jax.Array) -> jax.Array:
    """``x`` in device memory (an array of :func:`offload_state`'s state is in host memory)."""
    return _place(x, jax.memory.Space.Device)


def _moment_sources(
    jaxpr: Any, inputs: list[list[Any]], outputs: list[list[Any]]
) -> list[set[int]]:
    """Which moments' stored arrays (``inputs[j]``, invars of ``jaxpr``) each moment's new
    arrays (``outputs[k]``, its outvars) are computed from. An equation's outputs are taken to
    read every input of it (a call, a loop), so the answer errs towards more."""
    sources: dict[Any, frozenset[int]] = {
        var: frozenset({j}) for j, group in enumerate(inputs) for var in group
    }
    for eqn in jaxpr.eqns:
        read = frozenset().union(
            *(sources.get(v, frozenset()) for v in eqn.invars if not isinstance(v, Literal))
        )
        for var in eqn.outvars:
            sources[var] = read
    return [
        set().union(*(sources.get(v, ()) for v in group if not isinstance(v, Literal)))
        for group in outputs
    ]


def _needed(eqns: list[Any], targets: list[Any]) -> list[Any]:
    """The equations of ``eqns`` (in their order) that ``targets`` are computed from."""
    wanted = {v for v in targets if not isinstance(v, Literal)}
    kept = []
    for eqn in reversed(eqns):
        if any(v in wanted for v in eqn.outvars):
            kept.append(eqn)
            wanted.update(v for v in eqn.invars if not isinstance(v, Literal))
    return kept[::-1]


def _reads(eqns: list[Any], targets: list[Any]) -> list[Any]:
    """The variables that ``eqns`` read or ``targets`` name and that ``eqns`` do not define."""
    own = {v for eqn in eqns for v in eqn.outvars}
    read = [v for eqn in eqns for v in eqn.invars] + list(targets)
    return list(dict.fromkeys(v for v in read if not isinstance(v, Literal) and v not in own))


def _evaluate(eqns: list[Any], env: dict[Any, Any], debug_info: Any) -> None:
    """Binds in ``env`` every variable that ``eqns`` define, computed from those of ``env``."""
    defined = [v for eqn in eqns for v in eqn.outvars if not isinstance(v, DropVar)]
    read = _reads(eqns, [])
    effects = frozenset().union(*(eqn.effects for eqn in eqns))
    jaxpr = Jaxpr([], read, defined, eqns, effects, debug_info)
    values = jaxpr_as_fun(ClosedJaxpr(jaxpr, []))(*(env[v] for v in read))
    env.update(zip(defined, values, strict=True))


def _update_in_turn(
    step: Callable[[list[Any]], tuple[jax.Array, list[Any]]],
    stored: list[Any],
    previous: Any,
    transfers: _Transfers,
    *,
    in_parts: bool = True,
) -> tuple[jax.Array, list[Any], Any]:
    """One leaf's ``step`` (its stored moments -> its update and new stored moments), its
    moments brought from host memory one at a time (every array of ``stored`` is a device copy
    that ``transfers`` knows).

    A moment whose new value is computed from its own old value alone (Adam's ``mu`` and
    ``nu``) comes over by itself, is stepped and goes back; the next comes over only once it
    is back (an ``optimization_barrier`` joins its host arrays with the last host copy,
    ``previous`` for the first: the previous leaf's). The rest come over together, last. So
    the device holds a moment's old and new arrays and the new ones of the moments before it,
    not every moment's old and new arrays at once. ``step`` is traced once to a jaxpr, whose
    equations are then run in that order; the values a later part reads from an earlier one
    pass through a barrier, so that XLA does not compute them again from the old arrays.

    With ``in_parts`` false, every moment comes over at once (the core's choice for decoded and
    reduced stored forms: apart, a decoded moment's new value in the compute dtype would wait
    on the device for the update).

    Returns ``(update, new stored moments on the device, host copy of the last part's new
    moments)``; :func:`offload_state` returns the host copies in place of the new moments.
    """
    # Each array's host original and True, or the array itself and False where the state
    # keeps it on the device.
    host = [
        [
            (transfers.originals[id(x)][1], True) if id(x) in transfers.originals else (x, False)
            for x in jax.tree.leaves(tree)
        ]
        for tree in stored
    ]
    closed, shapes = jax.make_jaxpr(step, return_shape=True)(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), stored)
    )
    jaxpr = closed.jaxpr
    inputs, outputs = [], []
    invars, outvars = iter(jaxpr.invars), iter(jaxpr.outvars)
    num_update = len(jax.tree.leaves(shapes[0]))
    update_vars = [next(outvars) for _ in range(num_update)]
    for tree, new in zip(host, shapes[1], strict=True):
        inputs.append([next(invars) for _ in tree])
        outputs.append([next(outvars) for _ in jax.tree.leaves(new)])
    alone = []
    if in_parts:
        sources = _moment_sources(jaxpr, inputs, outputs)
        alone = [k for k, read in enumerate(sources) if read <= {k}]
    if len(alone) == len(stored):
        alone.pop()  # the last comes over with the update
    parts = [[k] for k in alone] + [[k for k in range(len(stored)) if k not in alone]]

    env: dict[Any, Any] = dict(zip(jaxpr.constvars, closed.consts, strict=True))
    given = {*jaxpr.constvars, *jaxpr.invars}
    pending = list(jaxpr.eqns)
    host_copies: dict[Any, jax.Array] = {}
    for number, part in enumerate(parts):
        last = number == len(parts) - 1
        on_host = [x for k in part for x, _ in host[k]]
        copied = [copy for k in part for _, copy in host[k]]
        if previous is not None:
            on_host, _ = jax.lax.optimization_barrier((on_host, previous))
        moved = [
            jax.device_put(x, jax.memory.Space.Device) if copy else x
            for x, copy in zip(on_host, copied, strict=True)
        ]
        targets = list(jaxpr.outvars) if last else [v for k in part for v in outputs[k]]
        eqns = _needed(pending, targets)
        carried = [v for v in _reads(eqns, targets) if v in env and v not in given]
        if carried:
            moved, values = jax.lax.optimization_barrier((moved, [env[v] for v in carried]))
            env.update(zip(carried, values, strict=True))
        env.update(zip([v for k in part for v in inputs[k]], moved, strict=True))
        _evaluate(eqns, env, jaxpr.debug_info)
        done = {id(eqn) for eqn in eqns}
        pending = [eqn for eqn in pending if id(eqn) not in done]
        new = [
            v
            for k in part
            for v in outputs[k]
            if not isinstance(v, Literal) and transfers.goes_to_host(v.aval.shape)
        ]
        previous = [jax.device_put(env[v], jax.memory.Space.Host) for v in new]
        host_copies.update(zip(new, previous, strict=True))

    def value(var: Any) -> Any:
        return var.val if isinstance(var, Literal) else env[var]

    for var, copy in host_copies.items():
        transfers.copies[id(env[var])] = (env[var], copy)
    update = jax.tree.unflatten(jax.tree.structure(shapes[0]), [value(v) for v in update_vars])
    new_stored = [
        jax.tree.unflatten(jax.tree.structure(new), [value(v) for v in group])
        for new, group in zip(shapes[1], outputs, strict=True)
    ]
    return update, new_stored, previous


@dataclasses.dataclass(frozen=True)
class _Offload(LeafSchedule):
    """The leaf schedule of :func:`offload_state`: a leaf whose stored arrays are copies of the
    state's host arrays (but those the state keeps on the device for their size, not all of
    them) is stepped by :func:`_update_in_turn`, once the such leaf
    ``prefetch + 1`` before it is done (the carry: the host copies and the update of the last
    ``prefetch + 1`` such leaves), the leaves in ``leaf_order`` (None: the tree's); ``inner``
    runs the step."""

    transfers: _Transfers
    inner: LeafSchedule = dataclasses.field(default_factory=WholeLeaves)
    prefetch: int = 0
    leaf_order: tuple[int, ...] | None = None

    def brings_from_host(self, leaf: LeafStep) -> bool:
        arrays = jax.tree.leaves(leaf.stored)
        copied = [id(x) in self.transfers.originals for x in arrays]
        return any(copied) and all(
            c or not self.transfers.goes_to_host(jnp.shape(x))
            for x, c in zip(arrays, copied, strict=True)
        )

    def order(self, num_leaves: int) -> tuple[int, ...]:
        if self.leaf_order is None:
            return self.inner.order(num_leaves)
        if len(self.leaf_order) != num_leaves:
            raise ValueError(
                f"offload_state's leaf_order has {len(self.leaf_order)} positions for the "
                f"{num_leaves} leaves a rule inside it steps: give the order of the params' "
                "flattened leaves (adam_jax.gradient_order) to an offload_state around the "
                "whole optimizer, whose rules step every param"
            )
        return self.leaf_order

    def around(self, schedule: LeafSchedule) -> LeafSchedule:
        return dataclasses.replace(self, inner=self.inner.around(schedule))

    def step(self, leaf: LeafStep, carry: Any) -> tuple[jax.Array, list[Any], Any]:
        # The host copies and update of the last such leaves, oldest first.
        done: tuple[Any, ...] = ()
        inner_carry: Any = None
        if carry is not None:
            done, inner_carry = carry
        if not self.brings_from_host(leaf):
            update, new, inner_carry = self.inner.step(leaf, inner_carry)
            return update, new, (done, inner_carry)
        previous = done[0] if len(done) > self.prefetch else None
        # Moments in their own dtype and shape come over one at a time. Decoded or reduced
        # ones come over together: apart, a decoded one keeps its new moments in the compute
        # dtype on the device until the update, and on an H200 apart cost more device bytes
        # for Adam-mini (12.6 against 8.5 B/param on the transformer-like tree).
        in_parts = not leaf.decodes and not leaf.reduces
        sent_back: list[Any] = []

        def in_turn(
            stored: list[Any],
            *,
            grad: jax.Array,
            param: Any,
            wait_for: Any,
            two_passes: bool = True,
        ) -> Any:
            del two_passes  # from host memory, in one pass

            def run(trees: list[Any]) -> tuple[jax.Array, list[Any]]:
                # In one pass: two would read the state from host memory twice.
                return leaf.run(trees, grad=grad, param=param, wait_for=wait_for, two_passes=False)

            update, new, host_copies = _update_in_turn(
                run, stored, previous, self.transfers, in_parts=in_parts
            )
            sent_back.append(host_copies)
            return update, new

        update, new, inner_carry = self.inner.step(leaf.with_run(in_turn), inner_carry)
        done = (*done, (sent_back[0], update))[-(self.prefetch + 1) :]
        return update, new, (done, inner_carry)


def check_host_memory(what: str) -> None:
    """Raises ValueError, naming ``what``, where the default backend has no host memory."""
    device = jax.devices()[0]
    kinds = sorted(memory.kind for memory in device.addressable_memories())
    if HOST not in kinds:
        raise ValueError(
            f"{what}: the {device.platform} backend has no {HOST!r} memory to keep the "
            f"optimizer state in (its memories: {', '.join(kinds)})"
        )


def _positions(leaf_order: Sequence[int]) -> tuple[int, ...]:
    """``leaf_order`` as a tuple of Python integers, checked to hold each of 0 to n - 1 once."""
    message = (
        "leaf_order must hold each position 0 to n - 1 of the params' n flattened leaves once, "
        f"got {leaf_order!r}"
    )
    try:
        order = tuple(operator.index(k) for k in leaf_order)
    except TypeError:
        raise ValueError(message) from None
    if sorted(order) != list(range(len(order))):
        raise ValueError(message)
    return order


def offload_state(
    inner: optax.GradientTransformation,
    *,
    leaf_by_leaf: bool = True,
    prefetch: int = 0,
    leaf_order: Sequence[int] | None = None,
    min_offloaded_size: int = 4096,
) -> optax.GradientTransformationExtraArgs:
    r"""Keeps ``inner``'s state in host memory between steps.

    ``init`` places every array of ``inner``'s state of at least ``min_offloaded_size``
    entries in host memory (the ``pinned_host`` memory kind, each device's shard in its own
    host's memory); the smaller ones (a bias's or a norm's moments, a step count) stay on the
    device, as torchao's ``CPUOffloadOptimizer`` keeps its params under ``minimal_size``: on a
    GPU each array is its own transfer each way, whose fixed cost outweighs a small array's
    bytes, and a leaf whose state stays steps beside the copies. An array not laid out like a
    param (a step count, any array ``inner.init`` makes afresh) goes replicated over the
    params' mesh (a ``NamedSharding``), or to the one device they are committed to, so that a
    plain ``jax.jit`` of the step takes the state beside the params. ``update`` brings the
    state to the device, runs ``inner``'s update and sends the new state back, in the same
    compiled program when it runs under ``jax.jit`` (an array already in the memory it goes to
    stays as it is). With ``leaf_by_leaf``, the rules of the core (every optimizer of the
    registry built on :func:`adam_jax.rules.scale_by_rule`) move their moments leaf by leaf,
    and a leaf's full-precision moments one at a time, so that in whatever order XLA runs the
    step the device holds at most 1.5x the largest leaf's state beside the small arrays it
    keeps (float32 AdamW; checked over every order by ``benchmarks/state_residency.py``); any
    other state comes over as a whole.
    The rules learn it from the leaf schedule :func:`offload_state` hands them as the extra
    argument ``leaf_schedule``, which optax's combinators (``chain``, ``inject_hyperparams``,
    ``masked``, ``partition``, ``apply_if_finite``, ``MultiSteps``) and the library's pass on;
    a wrapper that takes no extra arguments (``optax.lookahead``) hides the rules inside it,
    whose state then comes over as a whole:

    .. math::
        (u, s') = \mathrm{inner.update}(g, \mathrm{to\_device}(s), \theta), \qquad
        s_{\mathrm{host}} = \mathrm{to\_host}(s').

    Moving arrays between memories changes no value: the params and state are those of
    ``inner`` bit for bit. The state keeps ``inner``'s structure, so whatever reads it
    (``optax.tree_utils.tree_get``, :func:`adam_jax.schedule_free_eval_params`, checkpoints)
    reads it as before. Wrap the whole optimizer: ``optax.MultiSteps`` and
    ``optax.apply_if_finite`` go inside ``offload_state`` (their accumulated gradients and
    counters move too), not around it (their ``lax.cond`` would join a state in host memory
    with one on the device). This is torchao's ``CPUOffloadOptimizer`` and
    DeepSpeed's ZeRO-Offload in JAX's terms, with the step itself on the device.

    A wrapper that keeps the old state beside the new one (``optax.apply_if_finite``, which
    returns the old state when the gradients are not finite) needs the whole state on the
    device anyway: there ``leaf_by_leaf=False`` saves the second, leaf-by-leaf copy of the
    moments.

    Args:
      inner: the optimizer, e.g. :func:`adam_jax.adamw`; any ``GradientTransformation``.
      leaf_by_leaf: whether the core's moments come over one leaf at a time (True, the
        default), or with the rest of the state, as XLA schedules the copies.
      prefetch: with ``leaf_by_leaf``, how many leaves ahead a leaf's state may come over
        while the leaves before it are stepped, an integer >= 0. 0 (the default): once the
        previous leaf is done, so that the device holds one leaf's state at a time; ``k``:
        once the leaf ``k + 1`` before it is done, so that the transfers of one leaf overlap
        the steps of the next ``k``, for up to ``k + 1`` leaves' state on the device.
      leaf_order: with ``leaf_by_leaf``, the positions of the params' flattened leaves in the
        order their state comes over and is stepped, each once; ``None`` (the default): the
        tree's order. In a train step that computes the gradients and steps in one program,
        the order in which the backward pass computes them (:func:`adam_jax.gradient_order`)
        lets each leaf's copies run while the backward pass computes the gradients of the
        leaves after it, where the tree's order waits for its first leaf's gradient, which a
        backward pass often computes among the last.
      min_offloaded_size: the fewest entries an array of the state has to be kept in host
        memory, an integer >= 0 (the default, 4096, is torchao's; 0 keeps every array
        there).

    Returns:
      A ``GradientTransformationExtraArgs`` whose state is ``inner``'s, in host memory.

    Raises:
      ValueError: at construction, where the backend has no host memory kind, ``prefetch``
        or ``min_offloaded_size`` is not an integer >= 0, or ``leaf_order`` does not hold
        each position from 0 once or comes without ``leaf_by_leaf``; at the update, where
        ``leaf_order``'s length is not the number of leaves stepped.

    Example:
      >>> import jax, jax.numpy as jnp, adam_jax
      >>> tx = adam_jax.offload_state(adam_jax.adamw(1e-3))
      >>> state = tx.init({"w": jnp.ones((64, 64)), "b": jnp.ones(64)})
      >>> print(state[0].mu["w"].sharding.memory_kind, state[0].mu["b"].sharding.memory_kind)
      pinned_host device
    """
    check_host_memory("offload_state")
    for name, value in (("prefetch", prefetch), ("min_offloaded_size", min_offloaded_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    order = None if leaf_order is None else _positions(leaf_order)
    if order is not None and not leaf_by_leaf:
        raise ValueError(
            "leaf_order orders the leaves whose state comes over one at a time: give "
            "leaf_by_leaf=True (the default), or no leaf_order"
        )

    def init_fn(params: optax.Params) -> Any:
        return _to_host(inner.init(params), params, min_offloaded_size)

    def update_fn(
        updates: optax.Updates,
        state: Any,
        params: optax.Params | None = None,
        *,
        leaf_schedule: LeafSchedule | None = None,
        **extra: Any,
    ) -> tuple[optax.Updates, Any]:
        on_device = _place(state, jax.memory.Space.Device, min_offloaded_size)
        pairs = zip(jax.tree.leaves(on_device), jax.tree.leaves(state), strict=True)
        transfers = _Transfers(
            {id(moved): (moved, x) for moved, x in pairs if moved is not x}, min_offloaded_size
        )
        if leaf_by_leaf:
            offload = _Offload(transfers, prefetch=prefetch, leaf_order=order)
            leaf_schedule = offload if leaf_schedule is None else leaf_schedule.around(offload)
        if leaf_schedule is not None:
            extra["leaf_schedule"] = leaf_schedule
        updates, new_state = optax.with_extra_args_support(inner).update(
            updates, on_device, params, **extra
        )

        def back(x: Any) -> Any:
            copied = transfers.copies.get(id(x))
            if copied is not None:
                return copied[1]
            return _place(x, jax.memory.Space.Host, min_offloaded_size)

        return updates, jax.tree.map(back, new_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
