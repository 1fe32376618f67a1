"""Flax NNX models trained on MNIST with adam_jax.

Modules: :mod:`~examples.mnist.data` (IDX loader and downloader), :mod:`~examples.mnist.models`,
:mod:`~examples.mnist.optimizers`, :mod:`~examples.mnist.train` (the training loop),
:mod:`~examples.mnist.checkpoints`, :mod:`~examples.mnist.metrics` and
:mod:`~examples.mnist.interrupts` (what the loop survives: damaged checkpoints, full disks,
torn metrics files, SIGTERM and SIGINT), :mod:`~examples.mnist.errors`,
:mod:`~examples.mnist.compare` (optimizer comparison), :mod:`~examples.mnist.main` (the CLI)
and :mod:`~examples.mnist.baseline` (epoch time against a naive optax + ``nnx.jit`` loop).
"""
