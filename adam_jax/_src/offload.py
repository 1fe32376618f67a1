r"""Optimizer state in host memory.

An optimizer's state (two moments per parameter for Adam) is twice the params; on an
accelerator it is often what keeps a model from fitting. :func:`offload_state` keeps it in the
host's memory (JAX's ``pinned_host`` memory kind) between steps: during the forward and
backward passes the device holds none of it, and the update brings it over, steps it and sends
it back, inside the same compiled program.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

HOST = "pinned_host"


def _place(tree: Any, space: Any) -> Any:
    """``tree``'s arrays in the memory ``space``; an array already there stays as it is."""

    def place(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array) or jax.typeof(leaf).memory_space == space:
            return leaf
        return jax.device_put(leaf, space)

    return jax.tree.map(place, tree)


def on_device(x: jax.Array) -> jax.Array:
    """``x`` in device memory (an array of :func:`offload_state`'s state is in host memory)."""
    return _place(x, jax.memory.Space.Device)


def check_host_memory(what: str) -> None:
    """Raises ValueError, naming ``what``, where the default backend has no host memory."""
    device = jax.devices()[0]
    kinds = sorted(memory.kind for memory in device.addressable_memories())
    if HOST not in kinds:
        raise ValueError(
            f"{what}: the {device.platform} backend has no {HOST!r} memory to keep the "
            f"optimizer state in (its memories: {', '.join(kinds)})"
        )


def offload_state(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    r"""Keeps ``inner``'s state in host memory between steps.

    ``init`` places every array of ``inner``'s state in host memory (the ``pinned_host``
    memory kind, each device's shard in its own host's memory); ``update`` brings the state to
    the device, runs ``inner``'s update and sends the new state back, in the same compiled
    program when it runs under ``jax.jit`` (an array already in the memory it goes to stays as
    it is):

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

    Args:
      inner: the optimizer, e.g. :func:`adam_jax.adamw`; any ``GradientTransformation``.

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
        updates, new_state = optax.with_extra_args_support(inner).update(
            updates, on_device, params, **extra
        )
        return updates, _place(new_state, jax.memory.Space.Host)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
