"""Start here: the model, its ``nnx.Optimizer`` with adam_jax, the loss and the steps, in plain
Flax NNX. :class:`~examples.mnist.trainer.Trainer` runs these steps compiled for speed, and
:func:`~examples.mnist.loop.train_and_evaluate` the epochs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import adam_jax
from examples.mnist import models, optimizers
from examples.mnist.config import Config


def create_model_and_optimizer(
    config: Config, learning_rate: optax.Schedule, flat: bool = False
) -> tuple[nnx.Module, nnx.Optimizer]:
    """The network of ``config`` from its seed (``flat``: its params in one buffer per dtype),
    and the optimizer of its params."""
    model = models.create(config.model, config.seed, config.param_dtype)
    # How the moments are stored (--moments, --second-moment); {}: as the optimizer does.
    storages = optimizers.moment_storages(config.optimizer, config.moments, config.second_moment)
    if config.optimizer == "adam":  # The default: b1 0.9, b2 0.999, eps 1e-8.
        tx = adam_jax.adam(learning_rate, **storages)
    else:  # Any other of optimizers.NAMES: the Adam family, or a baseline from optax.
        tx = optimizers.create(config.optimizer, learning_rate, **storages)
    if flat:  # The optimizer sees the buffer's layout: per-tensor rules see each param.
        model = adam_jax.flat.FlatModel(model)
        tx = model.transformation(tx)
    # bfloat16 or float16 params: Kahan summation or stochastic rounding of their updates.
    tx = optimizers.with_low_precision(tx, config.low_precision, config.seed)
    if config.skip_nonfinite:
        # A step whose gradient has a NaN or an Inf leaves params and optimizer state alone.
        tx = optax.apply_if_finite(tx, config.max_consecutive_skips)
    if config.offload_state:  # outermost: all of the state in host memory between steps
        tx = adam_jax.offload_state(tx)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def loss_fn(
    model: nnx.Module, images: jax.Array, labels: jax.Array, rngs: nnx.Rngs
) -> tuple[jax.Array, jax.Array]:
    """The batch's mean loss, and its logits; ``rngs`` draws the dropout masks."""
    logits = model(images, train=True, rngs=rngs)
    return cross_entropy(logits, labels).mean(), logits


def train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    images: jax.Array,
    labels: jax.Array,
    rngs: nnx.Rngs,
) -> tuple[jax.Array, jax.Array]:
    """One optimizer step on a batch, in place; returns the batch's mean loss and logits."""
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(model, images, labels, rngs)
    optimizer.update(model, grads)
    return loss, logits


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def eval_step(
    model: nnx.Module, images: jax.Array, labels: jax.Array, mask: jax.Array
) -> jax.Array:
    """The summed loss and correct predictions of the examples where ``mask`` is true."""
    logits = model(images, train=False)
    loss = jnp.sum(cross_entropy(logits, labels) * mask)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
    return jnp.stack([loss, correct])
