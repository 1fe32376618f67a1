"""Flax NNX models for 28x28 grayscale images.

Every model is called as ``model(x, train=..., rngs=...)`` with ``x`` of shape
``(batch, 28, 28, 1)``: train/eval behaviour and dropout randomness are explicit arguments,
not module state, so one ``GraphDef`` serves both training and evaluation and the dropout key
can be derived from the step number (which makes resumed runs bit-identical).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def _avg_pool(x: jax.Array) -> jax.Array:
    return nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))


def _max_pool(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


class CNN(nnx.Module):
    """The Flax example network: two 3x3 convolutions with average pooling, two dense layers."""

    def __init__(self, *, rngs: nnx.Rngs, num_classes: int = 10):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.dense1 = nnx.Linear(7 * 7 * 64, 256, rngs=rngs)
        self.dense2 = nnx.Linear(256, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
        del train, rngs  # No dropout or batch norm.
        x = _avg_pool(nnx.relu(self.conv1(x)))
        x = _avg_pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        return self.dense2(nnx.relu(self.dense1(x)))


class MLP(nnx.Module):
    """A multilayer perceptron with two hidden layers."""

    def __init__(self, *, rngs: nnx.Rngs, hidden: int = 512, num_classes: int = 10):
        self.dense1 = nnx.Linear(28 * 28, hidden, rngs=rngs)
        self.dense2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.dense3 = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
        del train, rngs
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.dense1(x))
        x = nnx.relu(self.dense2(x))
        return self.dense3(x)


class DeepCNN(nnx.Module):
    """Four 3x3 convolutions (32, 32, 64, 64) with batch norm, max pooling and dropout, then
    two dense layers: the network of many Adam-on-MNIST tutorials."""

    def __init__(self, *, rngs: nnx.Rngs, num_classes: int = 10):
        self.convs = nnx.List(
            [
                nnx.Conv(c_in, c_out, kernel_size=(3, 3), use_bias=False, rngs=rngs)
                for c_in, c_out in ((1, 32), (32, 32), (32, 64), (64, 64))
            ]
        )
        self.norms = nnx.List([nnx.BatchNorm(c, momentum=0.9, rngs=rngs) for c in (32, 32, 64, 64)])
        self.dense1 = nnx.Linear(7 * 7 * 64, 256, use_bias=False, rngs=rngs)
        self.norm_dense = nnx.BatchNorm(256, momentum=0.9, rngs=rngs)
        self.dense2 = nnx.Linear(256, num_classes, rngs=rngs)
        self.conv_dropout = nnx.Dropout(0.25)
        self.dense_dropout = nnx.Dropout(0.5)

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
        eval_mode = not train
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = nnx.relu(norm(conv(x), use_running_average=eval_mode))
            if i % 2 == 1:
                x = self.conv_dropout(_max_pool(x), deterministic=eval_mode, rngs=rngs)
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.norm_dense(self.dense1(x), use_running_average=eval_mode))
        x = self.dense_dropout(x, deterministic=eval_mode, rngs=rngs)
        return self.dense2(x)


MODELS: dict[str, Callable[..., nnx.Module]] = {"cnn": CNN, "mlp": MLP, "deep_cnn": DeepCNN}


def create(name: str, seed: int, param_dtype: Any = jnp.float32) -> nnx.Module:
    """Builds model ``name`` with parameters initialized from ``seed`` (in float32, then
    stored in ``param_dtype``: the same initial values, rounded)."""
    model = MODELS[name](rngs=nnx.Rngs(seed))
    if jnp.dtype(param_dtype) != jnp.float32:
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda x: x.astype(param_dtype), params))
    return model
