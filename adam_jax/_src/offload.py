r"""Optimizer state in host memory.

An optimizer's state (two moments per parameter for Adam) is twice the params; on an
accelerator it is often what keeps a model from fitting. :func:`offload_state` keeps it in the
host's memory (JAX's ``pinned_host`` memory kind) between steps: during the forward and
backward passes the device holds none of it, and the update brings it over, steps it and sends
it back, inside the same compiled program.

Leaf by leaf: XLA places the copies between memories where its scheduler likes, and on a GPU it
brings every leaf's state over before the first leaf is stepped, so that the device holds the
whole state at once. The core (:func:`adam_jax.rules.scale_by_rule`, the rules of the registry)
moves its own moments in turn instead: a leaf's host state goes through
``jax.lax.optimization_barrier`` with the host copy of the previous leaf's new state before it
is copied over, so no copy to the device starts before the previous leaf is back in host
memory. While :func:`offload_state` traces its inner update, a :class:`_Transfers` in a
context variable maps each array it copied to the device to its host original, and each new
array the core copied back to that copy. The core returns its new moments typed as device
arrays, so that whatever combines them with the old state (``optax.apply_if_finite``'s
``lax.cond``) sees one memory, and :func:`offload_state` takes the host copy already made
instead of copying again. The copies it made of the state up front and that nothing read are
dropped by JAX.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import optax

HOST = "pinned_host"


@dataclasses.dataclass
class _Transfers:
    """What :func:`offload_state`'s update and the core tell each other while it traces: by
    ``id`` of a device array (kept, so that its id is not reused meanwhile), the host array it
    was copied from (``originals``) or the host copy the core made of it (``copies``)."""

    originals: dict[int, tuple[Any, Any]]
    copies: dict[int, tuple[Any, Any]] = dataclasses.field(default_factory=dict)


_TRANSFERS: contextvars.ContextVar[_Transfers | None] = contextvars.ContextVar(
    "transfers", default=None
)


def _in_space(leaf: Any, space: Any) -> bool:
    """Whether ``leaf`` is known to be in memory ``space``. A concrete array says so by its
    sharding; a traced one by its type, where only a ``device_put`` inside the trace sets the
    space: an argument in host memory is typed as device memory, so it always moves."""
    if isinstance(leaf, jax.core.Tracer):
        return space == jax.memory.Space.Host and jax.typeof(leaf).memory_space == space
    kind = getattr(leaf.sharding, "memory_kind", None)
    return (kind == HOST) == (space == jax.memory.Space.Host)


def _place(tree: Any, space: Any) -> Any:
    """``tree``'s arrays in the memory ``space``; an array known to be there stays as it is."""

    def place(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array) or _in_space(leaf, space):
            return leaf
        return jax.device_put(leaf, space)

    return jax.tree.map(place, tree)


def on_device(x: jax.Array) -> jax.Array:
    """``x`` in device memory (an array of :func:`offload_state`'s state is in host memory)."""
    return _place(x, jax.memory.Space.Device)


@contextlib.contextmanager
def _tracing(transfers: _Transfers) -> Iterator[None]:
    token = _TRANSFERS.set(transfers)
    try:
        yield
    finally:
        _TRANSFERS.reset(token)


def from_host_in_turn(stored: Any, previous: Any) -> tuple[Any, Any]:
    """One leaf's stored moments on the device, copied over only once ``previous`` (the host
    copy of the last leaf's new moments, or ``None``) exists.

    Returns ``(stored on the device, its host original)``; the original is ``None``, and
    ``stored`` comes back as it was, unless :func:`offload_state` is tracing and copied every
    array of ``stored`` from host memory."""
    transfers = _TRANSFERS.get()
    arrays = jax.tree.leaves(stored)
    if transfers is None or not arrays or any(id(x) not in transfers.originals for x in arrays):
        return stored, None
    host = jax.tree.map(lambda x: transfers.originals[id(x)][1], stored)
    if previous is not None:
        host, _ = jax.lax.optimization_barrier((host, previous))
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device), host), host


def to_host(new_stored: Any) -> Any:
    """The host copy of a leaf's new stored moments (see :func:`from_host_in_turn`), which
    :func:`offload_state` returns in their place."""
    transfers = _TRANSFERS.get()
    assert transfers is not None, "to_host follows from_host_in_turn"

    def copy(x: jax.Array) -> jax.Array:
        on_host = jax.device_put(x, jax.memory.Space.Host)
        transfers.copies[id(x)] = (x, on_host)
        return on_host

    return jax.tree.map(copy, new_stored)


def check_host_memory(what: str) -> None:
    """Raises ValueError, naming ``what``, where the default backend has no host memory."""
    device = jax.devices()[0]
    kinds = sorted(memory.kind for memory in device.addressable_memories())
    if HOST not in kinds:
        raise ValueError(
            f"{what}: the {device.platform} backend has no {HOST!r} memory to keep the "
            f"optimizer state in (its memories: {', '.join(kinds)})"
        )


def offload_state(
    inner: optax.GradientTransformation, *, leaf_by_leaf: bool = True
) -> optax.GradientTransformationExtraArgs:
    r"""Keeps ``inner``'s state in host memory between steps.

    ``init`` places every array of ``inner``'s state in host memory (the ``pinned_host``
    memory kind, each device's shard in its own host's memory); ``update`` brings the state to
    the device, runs ``inner``'s update and sends the new state back, in the same compiled
    program when it runs under ``jax.jit`` (an array already in the memory it goes to stays as
    it is). With ``leaf_by_leaf``, the rules of the core (every optimizer of the registry built
    on :func:`adam_jax.rules.scale_by_rule`) move their moments leaf by leaf, so the device
    holds about one leaf's state at a time; any other state comes over as a whole:

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

    Returns:
      A ``GradientTransformationExtraArgs`` whose state is ``inner``'s, in host memory.

    Raises:
      ValueError: at construction, where the backend has no host memory kind.

    Example:
      >>> import jax, jax.numpy as jnp, adam_jax
      >>> tx = adam_jax.offload_state(adam_jax.adamw(1e-3))
      >>> state = tx.init({"w": jnp.ones(3)})
      >>> print(state[0].mu["w"].sharding.memory_kind)
      pinned_host
    """
    check_host_memory("offload_state")

    def init_fn(params: optax.Params) -> Any:
        return _place(inner.init(params), jax.memory.Space.Host)

    def update_fn(
        updates: optax.Updates, state: Any, params: optax.Params | None = None, **extra: Any
    ) -> tuple[optax.Updates, Any]:
        on_device = _place(state, jax.memory.Space.Device)
        pairs = zip(jax.tree.leaves(on_device), jax.tree.leaves(state), strict=True)
        transfers = _Transfers({id(moved): (moved, x) for moved, x in pairs if moved is not x})
        with _tracing(transfers) if leaf_by_leaf else contextlib.nullcontext():
            updates, new_state = optax.with_extra_args_support(inner).update(
                updates, on_device, params, **extra
            )

        def back(x: Any) -> Any:
            copied = transfers.copies.get(id(x))
            return copied[1] if copied is not None else _place(x, jax.memory.Space.Host)

        return updates, jax.tree.map(back, new_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
