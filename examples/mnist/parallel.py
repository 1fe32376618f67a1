"""Data parallelism: a one-axis device mesh ``data`` over which every batch is split.

The params are replicated; the optimizer state is replicated too, or with ``shard_optimizer``
split over the devices (ZeRO-1: :func:`adam_jax.sharding.state_shardings`). The train step is
the one-device step compiled with these shardings (with ZeRO-1,
:meth:`DataParallel.sharded_train_step`, which also lays the gradients out as the moments): XLA's
SPMD partitioner adds the communication (the sum of the gradients over the devices and, with
ZeRO-1, the gathering of the params updated in slices). With several processes the mesh spans
the devices of all of them and the same code runs in each.

Meshes with ``Explicit`` axes (``jax.make_mesh``'s default) and with ``Auto`` axes both work:
where the layout of a value has to be stated, :meth:`DataParallel.gather` and
:meth:`DataParallel.place` state it in the form each accepts (part of the type under
``Explicit``, a hint to the partitioner under ``Auto``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from adam_jax.sharding import state_shardings, with_data_axis
from examples.common import distributed
from examples.mnist import step

DATA = "data"


def data_mesh(devices: int | None, axis_type: AxisType = AxisType.Explicit) -> Mesh:
    """The ``(devices,)`` mesh of axis ``data`` (see :func:`distributed.mesh_devices` for
    which devices and for ``None``)."""
    chosen = distributed.mesh_devices(devices)
    return jax.make_mesh((len(chosen),), (DATA,), (axis_type,), devices=chosen)


def _key_name(key: Any) -> Any:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return getattr(key, attribute)
    raise TypeError(f"unexpected pytree key {key!r}")


class DataParallel:
    """The shardings of a run on ``mesh`` and the operations that place values on it."""

    def __init__(self, mesh: Mesh):
        if mesh.axis_names != (DATA,):
            raise ValueError(f"the mesh must have the one axis {DATA!r}, got {mesh.axis_names}")
        self.mesh = mesh
        self.devices = mesh.shape[DATA]
        self.explicit = mesh.axis_types == (AxisType.Explicit,)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.batch = NamedSharding(mesh, PartitionSpec(DATA))  # (batch, ...) arrays
        self.batches = NamedSharding(mesh, PartitionSpec(None, DATA))  # (steps, batch, ...)

    @staticmethod
    def put(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
        """The global array of ``host``, which every process holds whole; each process copies
        only the parts that its own devices hold."""
        host = np.asarray(host)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def replicate(self, tree: Any) -> Any:
        return jax.tree.map(lambda leaf: self.put(leaf, self.replicated), tree)

    def state_shardings(
        self,
        state: nnx.State,
        tx: optax.GradientTransformation,
        params: Any,
        shard_optimizer: bool,
    ) -> Any:
        """The shardings of the ``(model, optimizer)`` state, a tree like ``state``: all
        replicated, but with ``shard_optimizer`` the optimizer state's arrays (``state[1]
        ["opt_state"]``, initialized by ``tx`` from ``params``) get their ZeRO-1 shardings."""
        if not shard_optimizer:
            return jax.tree.map(self._replicated_like, state)
        zero = state_shardings(tx, params, self.mesh, DATA)
        # nnx keeps optax's state as nested dicts: a namedtuple field or a tuple position
        # becomes a dict key of the same name, so the two trees match by key names.
        by_names = {
            tuple(map(_key_name, path)): sharding
            for path, sharding in jax.tree_util.tree_leaves_with_path(zero)
        }

        def leaf_sharding(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
            names = tuple(map(_key_name, path[:-1]))  # The last key is the Variable's value.
            if names[:2] == (1, "opt_state"):
                return by_names[names[2:]]
            return self._replicated_like(leaf)

        return jax.tree_util.tree_map_with_path(leaf_sharding, state)

    def _replicated_like(self, leaf: Any) -> NamedSharding:
        """Replicated, in the memory ``leaf`` is in (host memory for adam_jax.offload_state's
        state)."""
        kind = getattr(getattr(leaf, "sharding", None), "memory_kind", None)
        return (
            self.replicated if kind in (None, "device") else self.replicated.with_memory_kind(kind)
        )

    def gather(self, array: jax.Array, indices: jax.Array) -> jax.Array:
        """``array[indices]`` split over the data axis, as ``indices`` is: each device gathers
        its share of the batch from its copy of the replicated ``array``."""
        if self.explicit:
            # The sharding of a gather by split indices is ambiguous to the type system.
            return array.at[indices].get(out_sharding=self.batch)
        return jax.lax.with_sharding_constraint(array[indices], self.batch)

    def place(self, tree: Any, shardings: Any) -> Any:
        """``tree`` laid out as ``shardings`` (inside a jitted function)."""
        if self.explicit:
            return jax.sharding.reshard(tree, shardings)
        return jax.lax.with_sharding_constraint(tree, shardings)

    def zero_sliced(self, grads: Any) -> Any:
        """The gradients in the ZeRO-1 layout of the moments (each param's on the data axis
        where a dimension divides): the sum over the devices becomes a reduce-scatter that
        delivers to each device the slice it updates. Under ``Explicit`` axes it is needed as
        well: ``optax.apply_if_finite`` chooses between the update (sliced like the moments)
        and zeros like the gradient in a ``lax.cond``, whose branches must have one type."""
        shardings = jax.tree.map(
            lambda grad: with_data_axis(self.replicated, grad.shape, DATA), grads
        )
        return self.place(grads, shardings)

    def sharded_train_step(
        self,
        model: nnx.Module,
        optimizer: nnx.Optimizer,
        images: jax.Array,
        labels: jax.Array,
        rngs: nnx.Rngs,
    ) -> tuple[jax.Array, jax.Array]:
        """:func:`~examples.mnist.step.train_step` for ``--shard-optimizer`` (ZeRO-1): the same
        step, with the gradients placed by :meth:`zero_sliced` before the update."""
        grad_fn = nnx.value_and_grad(step.loss_fn, has_aux=True)
        (loss, logits), grads = grad_fn(model, images, labels, rngs)
        optimizer.update(model, self.zero_sliced(grads))
        return loss, logits
