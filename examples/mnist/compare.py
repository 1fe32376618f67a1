"""Optimizer comparison: the same model, initialization and data order with each optimizer.

Each optimizer trains in ``WORKDIR/<optimizer>`` at its tuned peak learning rate (see
:data:`examples.mnist.optimizers.PEAK_LEARNING_RATES`) under the run's schedule. The results
go to ``WORKDIR/comparison.md`` (final accuracy, epochs and seconds to reach the
:func:`targets`) and ``WORKDIR/comparison.png`` (test accuracy and loss against epoch and
against wall time). Targets and plot ranges come from the results, so that they fit any dataset
(MNIST ends near 99%, Fashion-MNIST near 90%).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from examples.mnist import data as data_lib
from examples.mnist import distributed, optimizers, train
from examples.mnist.config import Config


def first_reaching(history: list[train.Metrics], threshold: float) -> train.Metrics | None:
    """The first epoch's record whose test accuracy is at least ``threshold``."""
    return next((m for m in history if m["test_accuracy"] >= threshold), None)


def targets(results: dict[str, list[train.Metrics]]) -> tuple[float, ...]:
    """Test accuracies to time the optimizers to: the best accuracy that every optimizer
    reached and the median of their best accuracies, rounded down to 0.1 percentage point.

    Every optimizer reaches the first and about half of them the second, on any dataset.
    """
    bests = [max(m["test_accuracy"] for m in history) for history in results.values()]
    levels = (min(bests), statistics.median_low(bests))
    # Rounded down, but never above the accuracy it stands for (floating-point products).
    rounded = [min(math.floor(level * 1000 + 1e-6) / 1000, level) for level in levels]
    return tuple(sorted(set(rounded)))


def accuracy_range(results: dict[str, list[train.Metrics]]) -> tuple[float, float]:
    """The y-range (%) of the accuracy plots: from below the worst final accuracy to above
    the best accuracy, by half their spread (at least 0.5 points); earlier, lower epochs fall
    below it, so that the ends of training, where optimizers differ, stay legible."""
    finals = [100 * history[-1]["test_accuracy"] for history in results.values()]
    best = 100 * max(m["test_accuracy"] for history in results.values() for m in history)
    margin = max(0.5, (best - min(finals)) / 2)
    return max(0.0, min(finals) - margin), min(100.0, best + margin / 2)


def table(config: Config, results: dict[str, list[train.Metrics]]) -> str:
    """The comparison as a Markdown table."""
    header = ["optimizer", "peak lr", "final test acc.", "best test acc."]
    thresholds = targets(results)
    for threshold in thresholds:
        header += [f"epochs to {threshold:.1%}", f"seconds to {threshold:.1%}"]
    header.append("total seconds")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, history in results.items():
        peak = optimizers.peak_learning_rate(name, config.learning_rate)
        row = [
            name,
            f"{peak:g}",
            f"{history[-1]['test_accuracy']:.2%}",
            f"{max(m['test_accuracy'] for m in history):.2%}",
        ]
        for threshold in thresholds:
            hit = first_reaching(history, threshold)
            row += [str(hit["epoch"]), f"{hit['elapsed_seconds']:.0f}"] if hit else ["-", "-"]
        row.append(f"{history[-1]['elapsed_seconds']:.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def describe(config: Config, n_train: int) -> str:
    return (
        f"{config.model} on {config.dataset} ({n_train} training images), {config.epochs} epochs, "
        f"batch {config.batch_size}, schedule {config.schedule} "
        f"(warmup {config.warmup_epochs:g} epochs), random shifts up to {config.max_shift} px, "
        f"seed {config.seed}; test accuracy on the full test set after each epoch; seconds "
        "are cumulative wall time of training and evaluation, compilation included."
    )


def plot(results: dict[str, list[train.Metrics]], path: Path, title: str) -> None:
    """Test accuracy and loss against epoch and against wall time, one line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for name, history in results.items():
        epochs = [m["epoch"] for m in history]
        seconds = [m["elapsed_seconds"] for m in history]
        accuracy = [100 * m["test_accuracy"] for m in history]
        loss = [m["test_loss"] for m in history]
        axes[0, 0].plot(epochs, accuracy, "o-", label=name)
        axes[0, 1].plot(seconds, accuracy, "o-", label=name)
        axes[1, 0].plot(epochs, loss, "o-", label=name)
        axes[1, 1].plot(seconds, loss, "o-", label=name)
    for ax in axes[0]:
        ax.set(ylabel="test accuracy (%)", ylim=accuracy_range(results))
    for ax in axes[1]:
        ax.set(ylabel="test loss", yscale="log")
    for ax in axes[:, 0]:
        ax.set(xlabel="epoch")
    for ax in axes[:, 1]:
        ax.set(xlabel="wall time (s)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(
    config: Config,
    names: Sequence[str],
    dataset: data_lib.Dataset | None = None,
    console: Console | None = None,
) -> dict[str, list[train.Metrics]]:
    """Trains ``config`` once per optimizer in ``names``; writes the table and the plot."""
    console = console or Console()
    for name in names:
        optimizers.create(name, 0.0)  # Fails early on an unknown name.
    dataset = dataset or data_lib.load(config.dataset, config.data_dir)
    workdir = Path(config.workdir)
    results = {}
    for name in names:
        peak = optimizers.peak_learning_rate(name, config.learning_rate)
        console.rule(f"{name}, peak learning rate {peak:g}")
        run = dataclasses.replace(config, optimizer=name, workdir=str(workdir / name))
        _, results[name] = train.train_and_evaluate(run, dataset, console)
    n_train = min(len(dataset.train.labels), config.train_limit or len(dataset.train.labels))
    markdown = f"{describe(config, n_train)}\n\n{table(config, results)}\n"
    if not distributed.is_primary():  # With several processes, the first one writes.
        return results
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "comparison.md").write_text(markdown)
    plot(results, workdir / "comparison.png", f"{config.model} on {config.dataset}")
    console.print(markdown)
    console.print(f"Wrote {workdir / 'comparison.md'} and {workdir / 'comparison.png'}")
    return results
