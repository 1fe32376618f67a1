"""Flax NNX models trained on MNIST with adam_jax.

Modules: :mod:`~examples.mnist.data` (IDX loader and downloader), :mod:`~examples.mnist.models`,
:mod:`~examples.mnist.optimizers`, :mod:`~examples.mnist.train` (the training loop),
:mod:`~examples.mnist.compare` (optimizer comparison), :mod:`~examples.mnist.main` (the CLI) and
:mod:`~examples.mnist.baseline` (epoch time against a naive optax + ``nnx.jit`` loop).
"""
