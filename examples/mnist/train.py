"""The training library behind ``python -m examples.mnist``, by the names that the notebook,
the benchmarks and the tests import.

Read it in this order: :mod:`~examples.mnist.step` (the model, its ``nnx.Optimizer`` with
adam_jax, the loss, the train and eval steps), :mod:`~examples.mnist.augment` (shifts and
standardization), :mod:`~examples.mnist.trainer` (the steps compiled for speed),
:mod:`~examples.mnist.loop` (the run: records, checkpoints, stops and resumes),
:mod:`~examples.mnist.console` and :mod:`~examples.mnist.plots` (what a run prints and draws).
"""

from examples.common.metrics import Metrics
from examples.mnist.augment import normalize, random_shift
from examples.mnist.console import read_metrics, summary
from examples.mnist.loop import train_and_evaluate
from examples.mnist.plots import curves_figure, plot_curves
from examples.mnist.step import cross_entropy
from examples.mnist.trainer import MAX_IN_FLIGHT, SUMS, Trainer, epoch_means, packs_params

__all__ = [
    "MAX_IN_FLIGHT",
    "SUMS",
    "Metrics",
    "Trainer",
    "cross_entropy",
    "curves_figure",
    "epoch_means",
    "normalize",
    "packs_params",
    "plot_curves",
    "random_shift",
    "read_metrics",
    "summary",
    "train_and_evaluate",
]
