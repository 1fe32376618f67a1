"""Many-leaf path: parameters and optimizer state in one contiguous buffer per dtype.

An Adam step over a tree of ``L`` leaves is ``L`` small elementwise loops (or fusions, or GPU
kernels), each with its own launch / loop overhead, and the jitted update has ``L`` times as many
HLO instructions to trace and compile. Packing the leaves into one flat 1-D buffer per
``(dtype, label)`` group turns the step into one loop over one big array, whatever the shape of
the tree: the spirit of PyTorch's multi-tensor apply and of FSDP's flat parameters.

The container is :class:`FlatParams`, an ordinary pytree whose children are the flat buffers and
whose static auxiliary data is the :class:`FlatLayout` (tree structure, shapes, dtypes, offsets).
Every optax / adam_jax transformation therefore works on it unchanged, and so do ``jax.jit``
(with donation), ``jax.grad``, checkpointing and sharding of the buffers.

Two ways to use it:

1. Keep the parameters flat (fastest). The model reads *views* of the buffer,
   ``fp.to_tree()``, which is a ``jnp.split`` + ``reshape`` of each buffer; its transpose is a
   single ``concatenate``, so ``jax.grad`` with respect to the :class:`FlatParams` returns a
   flat gradient directly, without any extra copy in the optimizer::

     fp = flat.flatten(params, labels=decay_mask)     # decay_mask: tree of bools (or None)
     opt = adam_jax.adamw(1e-3, weight_decay=1e-2, mask=flat.labels)
     state = opt.init(fp)

     def loss_fn(fp, batch):
       return model_loss(fp.to_tree(), batch)

     grads = jax.grad(loss_fn)(fp, batch)              # a FlatParams, one buffer per group
     updates, state = opt.update(grads, state, fp)
     fp = optax.apply_updates(fp, updates)
     params = fp.to_tree()                             # exact round trip

2. Keep the ordinary tree and wrap the transformation: :func:`flat` concatenates gradients
   (and params) into the flat layout inside the update, runs the inner transformation on the
   buffers (its state is flat) and splits the updates back. This costs extra copies of the
   gradients, params and updates, and XLA compiles a many-way concatenate + split slowly, so
   on CPU it can be slower than the tree path (BENCHMARKS.md has the figures). It exists for
   state layout compatibility; prefer keeping the parameters flat (1.).

Moments stay per tensor where it matters: reduced and shape-aware moment storages (Adam-mini's
block means, factored second moments, the 4-bit rank-1 second moment) act on each packed
tensor in its own shape, and per-tensor reductions (:meth:`adam_jax.rules.Leaf.sum`) on each tensor,
so an optimizer's state and steps on :class:`FlatParams` are those on the tree.

Weight-decay masks and any other per-leaf labels (for ``optax.multi_transform``) are honoured by
grouping leaves by label as well as dtype: every buffer holds leaves of one label only, so a
label tree over the buffers (:func:`labels`) is exact. The labels are part of the static layout.

Flax NNX: ``flat_model = flat.FlatModel(model)``, then ``nnx.Optimizer(flat_model,
flat_model.transformation(tx), wrt=nnx.Param)``; the model's params live in the buffers,
calling the :class:`FlatModel` calls the model on views of them, and the transformation hands
``tx`` the buffers with their layout (per-tensor rules see each tensor). By
hand: ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``;
``fp = flat.flatten(params)``; in the loss, ``nnx.merge(graphdef, fp.to_tree(), rest)``.
"""

import typing as _typing

from adam_jax._src.flat import (
    FlatLayout,
    FlatParams,
    FlatState,
    flat,
    flatten,
    labels,
    layout_of,
)

if _typing.TYPE_CHECKING:
    from adam_jax._src.flat_nnx import FlatModel

__all__ = [
    "FlatLayout",
    "FlatModel",
    "FlatParams",
    "FlatState",
    "flat",
    "flatten",
    "labels",
    "layout_of",
]


def __getattr__(name: str) -> _typing.Any:
    # FlatModel needs Flax, which adam_jax does not depend on: imported when first read.
    if name == "FlatModel":
        from adam_jax._src.flat_nnx import FlatModel

        return FlatModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
