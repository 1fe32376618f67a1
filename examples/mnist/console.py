"""What a run prints: its size when it starts, a progress bar per epoch, a line of figures at
each epoch's end, warnings, and a summary at the end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from examples.common import metrics as metrics_lib
from examples.common.metrics import Metrics
from examples.mnist.config import Config
from examples.mnist.trainer import Trainer


def progress_bar(enabled: bool, console: Console) -> Progress:
    """The bar of each epoch, on a terminal or in a notebook only: redirected to a file, a bar
    would arrive as a pile of redrawn lines."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not (enabled and (console.is_terminal or console.is_jupyter)),
    )


def warner(console: Console) -> Callable[[str], None]:
    def warn(message: str) -> None:
        # Not markup: messages quote paths and shapes such as float32[784, 512].
        console.print(
            f"warning: {message}", style="yellow", markup=False, highlight=False, soft_wrap=True
        )

    return warn


def read_metrics(path: Path, console: Console | None = None) -> list[Metrics]:
    """The records of a ``metrics.jsonl`` file; unreadable lines are reported on ``console``."""
    return metrics_lib.read(path, warner(console or Console()))


def print_size(console: Console, trainer: Trainer) -> None:
    """The number of parameters and the bytes per parameter of params and optimizer state."""
    config = trainer.config
    n, param_bytes, state_bytes = trainer.num_params, trainer.param_bytes, trainer.state_bytes
    # How params and moments are stored, where it is not the default.
    storage = [config.param_dtype]
    if config.low_precision != "none":
        storage.append(config.low_precision)
    if config.moments != "default":
        storage.append(f"{config.moments} moments")
    if config.second_moment != "default":
        storage.append(f"{config.second_moment} second moment")
    console.print(
        f"{n:,} parameters ({', '.join(storage)}), bytes per parameter: "
        f"{param_bytes / n:.2f} params + {state_bytes / n:.2f} optimizer state "
        f"= {(param_bytes + state_bytes) / n:.2f}",
        soft_wrap=True,
    )
    if config.offload_state:
        console.print(
            f"optimizer state in host memory: {trainer.host_state_bytes / n:.2f} bytes per "
            "parameter off the device between steps",
            soft_wrap=True,
        )


def bar_status(means: Metrics, images_per_second: float, skipped: int | None) -> str:
    """The figures beside the bar: the epoch's mean loss and accuracy so far, the speed, and
    the steps skipped (``None``: steps are not skipped)."""
    skips = "" if skipped is None else f"  skipped {skipped}"
    return (
        f"loss {means['train_loss'] or 0.0:.4f}  "
        f"acc {means['train_accuracy'] or 0.0:.2%}  {images_per_second:,.0f} img/s{skips}"
    )


def print_epoch(console: Console, record: Metrics, skip_nonfinite: bool) -> None:
    """The line of an epoch's record."""
    skipped = f", {record['skipped_steps']} steps skipped" if skip_nonfinite else ""
    console.print(
        f"epoch {record['epoch']:3d}  train loss {_format(record['train_loss'])}  "
        f"test loss {record['test_loss']:.4f}  "
        f"test accuracy {record['test_accuracy']:.2%}  "
        f"{record['images_per_second']:,.0f} img/s  {record['seconds']:.1f} s{skipped}",
        highlight=False,
        soft_wrap=True,
    )


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def summary(config: Config, history: list[Metrics]) -> str:
    """A few lines on how the run went."""
    last = history[-1]
    best = max(history, key=lambda m: m["test_accuracy"])
    workdir = Path(config.workdir)
    return "\n".join(
        [
            f"{config.model} trained with {config.optimizer} on {config.dataset} "
            f"for {last['epoch']} epochs ({last['elapsed_seconds']:.0f} s).",
            f"Final test accuracy: {last['test_accuracy']:.2%} "
            f"(best {best['test_accuracy']:.2%} after epoch {best['epoch']}); "
            f"test loss {last['test_loss']:.4f}.",
            f"Metrics: {workdir / 'metrics.jsonl'}   curves: {workdir / 'curves.png'}",
        ]
    )
