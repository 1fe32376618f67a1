"""Optimizer comparison: the same model, initialization and data order with each optimizer.

Each optimizer trains in ``WORKDIR/<optimizer>`` (with ``seeds > 1``, once per seed in
``WORKDIR/<optimizer>/seed<S>``, the results averaged per epoch) at its tuned peak learning
rate (see :data:`examples.mnist.optimizers.PEAK_LEARNING_RATES`) under the run's schedule.
The results go to ``WORKDIR/comparison.md`` (final accuracy, epochs and seconds to reach the
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

from examples.common import distributed
from examples.common.metrics import Metrics
from examples.mnist import data as data_lib
from examples.mnist import optimizers
from examples.mnist.config import Config
from examples.mnist.loop import train_and_evaluate


def first_reaching(history: list[Metrics], threshold: float) -> Metrics | None:
    """The first epoch's record whose test accuracy is at least ``threshold``."""
    return next((m for m in history if m["test_accuracy"] >= threshold), None)


def targets(results: dict[str, list[Metrics]]) -> tuple[float, ...]:
    """Test accuracies to time the optimizers to: the best accuracy that every optimizer
    reached and the median of their best accuracies, rounded down to 0.1 percentage point.

    Every optimizer reaches the first and about half of them the second, on any dataset.
    """
    bests = [max(m["test_accuracy"] for m in history) for history in results.values()]
    levels = (min(bests), statistics.median_low(bests))
    # Rounded down, but never above the accuracy it stands for (floating-point products).
    rounded = [min(math.floor(level * 1000 + 1e-6) / 1000, level) for level in levels]
    return tuple(sorted(set(rounded)))


def accuracy_range(results: dict[str, list[Metrics]]) -> tuple[float, float]:
    """The y-range (%) of the accuracy plots: from below the worst final accuracy to above
    the best accuracy, by half their spread (at least 0.5 points); earlier, lower epochs fall
    below it, so that the ends of training, where optimizers differ, stay legible."""
    finals = [100 * history[-1]["test_accuracy"] for history in results.values()]
    best = 100 * max(m["test_accuracy"] for history in results.values() for m in history)
    margin = max(0.5, (best - min(finals)) / 2)
    return max(0.0, min(finals) - margin), min(100.0, best + margin / 2)


def mean_history(histories: Sequence[list[Metrics]]) -> list[Metrics]:
    """The per-epoch mean of the runs' records (test accuracy and loss, seconds), with the
    spread of the test accuracy over the runs (``test_accuracy_min``, ``_max``, ``_sd``)."""
    merged = []
    for records in zip(*histories, strict=True):
        accuracies = [m["test_accuracy"] for m in records]
        merged.append(
            {
                "epoch": records[0]["epoch"],
                "test_accuracy": statistics.fmean(accuracies),
                "test_accuracy_min": min(accuracies),
                "test_accuracy_max": max(accuracies),
                "test_accuracy_sd": statistics.stdev(accuracies) if len(records) > 1 else 0.0,
                "test_loss": statistics.fmean(m["test_loss"] for m in records),
                "elapsed_seconds": statistics.fmean(m["elapsed_seconds"] for m in records),
            }
        )
    return merged


def table(config: Config, results: dict[str, list[Metrics]]) -> str:
    """The comparison as a Markdown table (with several seeds: of the per-epoch means, the
    final accuracy with its standard deviation over the seeds)."""
    header = ["optimizer", "peak lr", "final test acc.", "best test acc."]
    thresholds = targets(results)
    for threshold in thresholds:
        header += [f"epochs to {threshold:.1%}", f"seconds to {threshold:.1%}"]
    header.append("total seconds")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, history in results.items():
        peak = optimizers.peak_learning_rate(name, config.learning_rate)
        final = f"{history[-1]['test_accuracy']:.2%}"
        if history[-1].get("test_accuracy_sd"):
            final += f" ± {history[-1]['test_accuracy_sd']:.2%}"
        row = [
            name,
            f"{peak:g}",
            final,
            f"{max(m['test_accuracy'] for m in history):.2%}",
        ]
        for threshold in thresholds:
            hit = first_reaching(history, threshold)
            row += [str(hit["epoch"]), f"{hit['elapsed_seconds']:.0f}"] if hit else ["-", "-"]
        row.append(f"{history[-1]['elapsed_seconds']:.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def describe(config: Config, n_train: int, seeds: int = 1) -> str:
    seed_text = (
        f"seed {config.seed}"
        if seeds == 1
        else f"seeds {config.seed} to {config.seed + seeds - 1} (means over the seeds)"
    )
    return (
        f"{config.model} on {config.dataset} ({n_train} training images), {config.epochs} epochs, "
        f"batch {config.batch_size}, schedule {config.schedule} "
        f"(warmup {config.warmup_epochs:g} epochs; schedule-free: warmup then constant), "
        f"random shifts up to {config.max_shift} px, {seed_text}; test accuracy on the full "
        "test set after each epoch; seconds are cumulative wall time of training and "
        "evaluation, compilation included."
    )


def plot(results: dict[str, list[Metrics]], path: Path, title: str) -> None:
    """Test accuracy and loss against epoch and against wall time, one line per optimizer."""
    # A Figure of its own, outside pyplot: the caller's backend (a notebook's) stays as it is.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 2)
    colors = colormaps["tab10"].colors
    for index, (name, history) in enumerate(results.items()):
        # Past ten optimizers the colors repeat: another line style and marker tells them apart.
        style = {
            "color": colors[index % len(colors)],
            "linestyle": ("-", "--", ":")[index // len(colors) % 3],
            "marker": ("o", "s", "^")[index // len(colors) % 3],
            "label": name,
        }
        epochs = [m["epoch"] for m in history]
        seconds = [m["elapsed_seconds"] for m in history]
        accuracy = [100 * m["test_accuracy"] for m in history]
        loss = [m["test_loss"] for m in history]
        axes[0, 0].plot(epochs, accuracy, **style)
        if "test_accuracy_min" in history[0]:  # several seeds: their range
            low = [100 * m["test_accuracy_min"] for m in history]
            high = [100 * m["test_accuracy_max"] for m in history]
            axes[0, 0].fill_between(epochs, low, high, color=style["color"], alpha=0.15)
        axes[0, 1].plot(seconds, accuracy, **style)
        axes[1, 0].plot(epochs, loss, **style)
        axes[1, 1].plot(seconds, loss, **style)
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
    axes[0, 0].legend(fontsize="small", ncols=2 if len(results) > 6 else 1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def compare(
    config: Config,
    names: Sequence[str],
    dataset: data_lib.Dataset | None = None,
    console: Console | None = None,
    seeds: int = 1,
) -> dict[str, list[Metrics]]:
    """Trains ``config`` once per optimizer in ``names`` and seed (``config.seed`` and the
    ``seeds - 1`` after it); writes the table and the plot. Returns the records per optimizer
    (with several seeds, their per-epoch means: :func:`mean_history`)."""
    if seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds}")
    console = console or Console()
    for name in names:
        # Fails early on an unknown name, or settings the optimizer cannot take (--moments).
        dataclasses.replace(config, optimizer=name)
    dataset = dataset or data_lib.load(config.dataset, config.data_dir)
    workdir = Path(config.workdir)
    results = {}
    for name in names:
        peak = optimizers.peak_learning_rate(name, config.learning_rate)
        console.rule(f"{name}, peak learning rate {peak:g}")
        histories = []
        for offset in range(seeds):
            directory = workdir / name if seeds == 1 else workdir / name / f"seed{offset}"
            run = dataclasses.replace(
                config, optimizer=name, seed=config.seed + offset, workdir=str(directory)
            )
            histories.append(train_and_evaluate(run, dataset, console)[1])
        results[name] = histories[0] if seeds == 1 else mean_history(histories)
    n_train = min(len(dataset.train.labels), config.train_limit or len(dataset.train.labels))
    markdown = f"{describe(config, n_train, seeds)}\n\n{table(config, results)}\n"
    if not distributed.is_primary():  # With several processes, the first one writes.
        return results
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "comparison.md").write_text(markdown)
    plot(results, workdir / "comparison.png", f"{config.model} on {config.dataset}")
    console.print(markdown)
    console.print(f"Wrote {workdir / 'comparison.md'} and {workdir / 'comparison.png'}")
    return results
