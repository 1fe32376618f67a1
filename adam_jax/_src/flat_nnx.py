"""A Flax NNX model whose params live in flat buffers: :class:`adam_jax.flat.FlatModel`.

Imported only when ``adam_jax.flat.FlatModel`` is first read: Flax is not a dependency of
adam_jax.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx

from adam_jax._src.flat import FlatLayout, FlatParams, layout_of


class FlatModel(nnx.Module):
    """``model`` with its params packed in one buffer per dtype (and label), for
    ``nnx.Optimizer``: ``nnx.Optimizer(flat_model, flat_model.transformation(tx),
    wrt=nnx.Param)``.

    The buffers are the module's only ``param_type`` variables, so ``nnx.grad`` returns one gradient
    buffer per group and the optimizer steps a few long arrays instead of one per leaf
    (:mod:`adam_jax.flat`); ``nnx.jit`` hands over a few buffers instead of one per leaf.
    :meth:`transformation` hands ``tx`` the buffers as the :class:`~adam_jax.FlatParams` they are,
    so that what works per tensor (LAMB's trust ratios, Adam-mini's blocks, caution) sees each
    packed tensor, and what needs each tensor's shape (SOAP) refuses them in one line; ``tx`` itself
    would see each buffer as one tensor, which changes the steps of such optimizers (element-wise
    ones, Adam and AdamW, step the same either way). Calling it calls ``model`` on views of the
    buffers (:meth:`to_module`) and keeps what the call changed in the model's other variables
    (batch statistics, RNG counts); ``eval()``, ``train()`` and ``set_attributes`` reach the model's
    modules (``nnx.view`` does not: the model's modules are the wrapper's static ``graphdef``, not
    its submodules). The optimizer's steps (through :meth:`transformation`) and the model's outputs
    are those of ``model`` with its own params, to the rounding of the forward and backward passes
    that XLA may fuse otherwise. The params' metadata (a sharding annotation) is not carried to the
    buffers: shard them, if at all, as buffers.

    Args:
      model: any NNX module.
      labels: optional labels of the params (a tree like ``nnx.state(model, param_type)``,
        e.g. a weight-decay mask): each buffer holds params of one label (see
        :func:`adam_jax.flat.flatten`), and :meth:`labels` gives them to ``mask=``.
      param_type: the variables packed (``nnx.Param``); the buffers are of this type.

    Example:
      >>> import jax, jax.numpy as jnp, adam_jax
      >>> from flax import nnx
      >>> model = adam_jax.flat.FlatModel(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
      >>> tx = model.transformation(adam_jax.lamb(1e-3))
      >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      >>> grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 3)))))(model)
      >>> _ = optimizer.update(model, grads)
      >>> print(len(jax.tree.leaves(nnx.state(model, nnx.Param))))
      1
      >>> print(model.to_module().kernel.shape)
      (3, 2)
    """

    def __init__(
        self, model: nnx.Module, labels: Any = None, param_type: type[nnx.Variable] = nnx.Param
    ):
        graphdef, params, *rest = nnx.split(model, param_type, ...)
        packed = layout_of(params, labels).flatten(params)
        self.graphdef = graphdef
        self.layout = packed.layout
        self.param_type = param_type
        self.buffers = nnx.List([param_type(buffer) for buffer in packed.buffers])
        self.rest = nnx.data(rest[0])

    def flat_params(self) -> FlatParams:
        """The buffers, as a :class:`adam_jax.FlatParams`."""
        return FlatParams(tuple(buffer[...] for buffer in self.buffers), self.layout)

    def to_module(self) -> Any:
        """The model, its params views of the buffers: a new module, whose params do not write
        back to the buffers (use it to evaluate, to call other methods, to save the model in its
        own shape)."""
        return nnx.merge(self.graphdef, self.flat_params().to_tree(), self.rest)

    def transformation(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """``tx`` stepping this model's buffers as a :class:`~adam_jax.FlatParams` of its layout:
        its steps are those on the model's own params, per-tensor rules included.

        ``nnx.Optimizer`` hands a transformation the buffers as the leaves of a state; this one
        packs them (gradients and params) with the layout before ``tx`` sees them and returns
        the updates as it got them. Its state is the leaves of ``tx``'s state, in order (a
        ``FlatParams`` in a state would not survive ``nnx.Optimizer``, which keeps the state as
        mappings of variables): a wrapper whose state a program reads by name goes around it,
        ``optax.inject_hyperparams(lambda learning_rate:
        model.transformation(adam_jax.lamb(learning_rate)))(learning_rate=1e-3)``.

        Args:
          tx: any transformation (``adam_jax.lamb(1e-3)``, an ``optax.chain``...).

        Returns:
          An ``optax.GradientTransformationExtraArgs`` for ``nnx.Optimizer(self, ...)``.
        """
        return _on_buffers(tx, self.layout)

    def labels(self, params: Any) -> Any:
        """The label of each buffer in ``params`` (a state of this module's ``param_type``
        variables, as ``nnx.Optimizer`` gives it to its transformation): ``mask=model.labels``."""
        return jax.tree.unflatten(
            jax.tree.structure(params), [group.label for group in self.layout.groups]
        )

    def set_attributes(
        self,
        *filters: Any,
        raise_if_not_found: bool = True,
        graph: bool | None = None,
        **attributes: Any,
    ) -> None:
        """``model.set_attributes``, on the model's modules (``eval()`` and ``train()`` call it):
        their static attributes, such as ``deterministic``, are the wrapper's ``graphdef``."""
        model = self.to_module()
        model.set_attributes(
            *filters, raise_if_not_found=raise_if_not_found, graph=graph, **attributes
        )
        self.graphdef = nnx.split(model, self.param_type, ...)[0]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.to_module()
        out = model(*args, **kwargs)
        nnx.update(self.rest, nnx.state(model, nnx.Not(self.param_type)))
        return out


def _on_buffers(tx: optax.GradientTransformation, layout: FlatLayout) -> Any:
    """``tx`` on trees whose leaves are the buffers of ``layout``, in order (see
    :meth:`FlatModel.transformation`)."""

    def packed(tree: Any) -> FlatParams:
        return FlatParams(tuple(jax.tree.leaves(tree)), layout)

    def init_fn(params: Any) -> tuple[Any, ...]:
        return tuple(jax.tree.leaves(tx.init(packed(params))))

    def update_fn(
        updates: Any, state: Any, params: Any = None, **extra_args: Any
    ) -> tuple[Any, tuple[Any, ...]]:
        gradients = packed(updates)
        structure = jax.tree.structure(jax.eval_shape(tx.init, gradients))
        inner = jax.tree.unflatten(structure, jax.tree.leaves(state))
        flat_params = None if params is None else packed(params)
        stepped, inner = optax.with_extra_args_support(tx).update(
            gradients, inner, flat_params, **extra_args
        )
        steps = jax.tree.unflatten(jax.tree.structure(updates), stepped.buffers)
        return steps, tuple(jax.tree.leaves(inner))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
