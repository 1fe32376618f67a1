"""Flax NNX models trained on MNIST with adam_jax.

New to it? :mod:`examples.mnist_minimal` is the whole job in one short file. In this program,
start with :mod:`~examples.mnist.step` (the model, its ``nnx.Optimizer`` with adam_jax, the
loss and the train and eval steps). Then: :mod:`~examples.mnist.config` (the settings, which
are the command line's options too), :mod:`~examples.mnist.data` (IDX loader and downloader),
:mod:`~examples.mnist.models`, :mod:`~examples.mnist.optimizers`,
:mod:`~examples.mnist.augment` (random shifts, standardization),
:mod:`~examples.mnist.trainer` (the steps compiled for speed), :mod:`~examples.mnist.loop`
(the run: records, checkpoints, stops, resumes), :mod:`~examples.mnist.console` and
:mod:`~examples.mnist.plots` (what a run prints and draws), :mod:`~examples.mnist.train` (the
names the notebook and tests import), :mod:`~examples.common.checkpoints`,
:mod:`~examples.common.metrics` and :mod:`~examples.common.interrupts` (what the loop survives:
damaged checkpoints, full disks, torn metrics files, SIGTERM and SIGINT),
:mod:`~examples.common.errors`, :mod:`~examples.mnist.compare` (optimizer comparison),
:mod:`~examples.mnist.main` (the CLI) and :mod:`~examples.mnist.baseline` (epoch time against
a naive optax + ``nnx.jit`` loop).
"""
