"""ZeRO-1: the optimizer state sharded over the data axis while the params stay replicated.

In plain data parallelism every device holds the whole optimizer state (two float32 moments
for Adam, 8 bytes per parameter) and runs the whole update. ZeRO stage 1 (Rajbhandari et al.,
2020) splits the state over the ``N`` devices of the data axis instead: each device keeps and
updates ``1/N`` of every moment. In JAX this is a choice of shardings, nothing more:
:func:`state_shardings` gives every state leaf the sharding of its param plus the data axis on
one more dimension (as MaxText's ``shard_optimizer_over_data``), and ``jax.jit`` with those
shardings as ``out_shardings`` lets XLA's SPMD partitioner write the communication: each device
needs only its slice of the gradients summed over the data axis (a reduce-scatter where the
backend forms one; XLA:CPU all-reduces and keeps the slice), the update runs on the slices,
and the updated params are all-gathered back to their own sharding.

The recipe::

  import functools, jax, optax, adam_jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((8,), ("data",))
  param_shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)  # replicated
  params = jax.device_put(params, param_shardings)
  tx = adam_jax.adamw(1e-3, weight_decay=1e-2)
  opt_shardings = adam_jax.sharding.state_shardings(tx, params, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)

  @functools.partial(
      jax.jit, donate_argnums=(0, 1), out_shardings=(param_shardings, opt_shardings)
  )
  def train_step(params, opt_state, batch):  # batch sharded as P("data")
      grads = jax.grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

The same works with params that are already sharded over other mesh axes (FSDP or tensor
parallelism, e.g. a ``("data", "model")`` mesh): each state leaf keeps its param's sharding
and gets the data axis on a dimension still free, so per device it holds ``1/(data * model)``
of the moment. With 8-bit moments (:func:`adam_jax.adamw_8bit`) the codes and the block
scales are placed by their own shapes, in the same way. Meshes with ``Explicit`` and ``Auto``
axes both work; the transformations need no change.

Per device, the optimizer state then costs ``1/N`` of the replicated state (up to the leaves
too small to split: the step count, vectors with no dimension the data axis divides), and with
8-bit moments about ``1/(4N)`` of the float32 state. BENCHMARKS.md has the measured bytes and
step times on 1 to 8 devices (``python -m benchmarks.run --sections scaling``).
"""

from adam_jax._src.sharding import state_shardings, with_data_axis

__all__ = ["state_shardings", "with_data_axis"]
