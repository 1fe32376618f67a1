"""``curves.png``: the loss and accuracy of a run against epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from examples.common.metrics import Metrics


def curves_figure(records: list[Metrics], title: str) -> Any:
    """The matplotlib figure of ``curves.png``: loss (of the logged steps and per epoch) and
    accuracy (per epoch) against epochs. A ``Figure`` of its own, outside pyplot: drawing it
    leaves the caller's backend alone (a notebook keeps showing its plots)."""
    from matplotlib.figure import Figure

    epochs = [m for m in records if m["kind"] == "epoch"]
    steps = [m for m in records if m["kind"] == "step" and m["train_loss"] is not None]
    x = [m["epoch"] for m in epochs]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(
        [m["epoch"] for m in steps],
        [m["train_loss"] for m in steps],
        "-",
        color="C0",
        alpha=0.4,
        lw=1,
        label="train (logged steps)",
    )
    ax_loss.plot(x, [m["train_loss"] for m in epochs], "o-", color="C0", label="train (epoch)")
    ax_loss.plot(x, [m["test_loss"] for m in epochs], "o-", color="C1", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    for name, color in (("train", "C0"), ("test", "C1")):
        # An epoch whose steps were all skipped has no training accuracy.
        points = [(m["epoch"], m[f"{name}_accuracy"]) for m in epochs]
        points = [(epoch, 100 * value) for epoch, value in points if value is not None]
        if points:
            ax_acc.plot(*zip(*points, strict=True), "o-", color=color, label=name)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(records: list[Metrics], path: Path, title: str) -> None:
    """Writes :func:`curves_figure` to ``path``."""
    curves_figure(records, title).savefig(path, dpi=100)
