"""The training loop: a small library behind ``python -m examples.mnist``.

Speed on CPU comes from a few choices. The model and optimizer are split once into a
``GraphDef`` and a pure ``State``, and the step is a plain ``jax.jit`` over the state with the
state donated, which avoids ``nnx.jit``'s per-call graph traversal and reuses the parameter
buffers in place. Batches are gathered on device, by index, from a dataset copied to the device
once. Metrics are summed on device and read back one step late, so reading them never stalls
the pipeline. (Steps are not fused with ``lax.scan``: XLA:CPU runs convolutions inside a loop
an order of magnitude slower than at the top level, and dispatch is cheap next to a step.)

Reproducibility: the shuffle of epoch ``e`` is drawn from ``(seed, e)`` and the augmentation
and dropout keys from ``(seed, step)``, so a run resumed from the checkpoint of epoch ``e``
replays exactly the same computation as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from examples.mnist import data as data_lib
from examples.mnist import models, optimizers
from examples.mnist.config import Config

Metrics = dict[str, float]


def normalize(images: jax.Array, mean: float, std: float) -> jax.Array:
    """Pixel values in [0, 255], ``(b, 28, 28)`` -> standardized float32 ``(b, 28, 28, 1)``."""
    return ((images.astype(jnp.float32) / 255.0 - mean) / std)[..., None]


def random_shift(key: jax.Array, images: jax.Array, max_shift: int) -> jax.Array:
    """Shifts each image by up to ``max_shift`` pixels along each axis, filling with zeros.

    The shift is a product with one-hot matrices, ``rows @ padded @ cols.T``: on CPU, batched
    small matmuls are several times faster than a per-image ``dynamic_slice`` gather.
    """
    if max_shift == 0:
        return images
    height, width = images.shape[1:]
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    offsets = jax.random.randint(key, (images.shape[0], 2, 1, 1), 0, 2 * max_shift + 1)

    def one_hot(size: int, offset: jax.Array) -> jax.Array:
        # (batch, size, size + 2 * max_shift): row i selects padded index i + offset.
        target = jnp.arange(size)[None, :, None] + offset
        return (target == jnp.arange(size + 2 * max_shift)[None, None, :]).astype(images.dtype)

    rows, cols = one_hot(height, offsets[:, 0]), one_hot(width, offsets[:, 1])
    return jnp.einsum("bij,bjk,blk->bil", rows, padded, cols)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


class Trainer:
    """A model, its optimizer and the compiled functions that train and evaluate it.

    ``state`` is the pure ``nnx.State`` of ``(model, optimizer)``; it is the only thing that
    changes between calls, and what checkpoints hold.
    """

    progress_every = 10  # Steps between progress reports.

    def __init__(self, config: Config, dataset: data_lib.Dataset):
        self.config = config
        self.dataset = dataset
        n_train = len(dataset.train.labels)
        if config.train_limit is not None:
            n_train = min(n_train, config.train_limit)
        # The last partial batch is dropped: every step has the same static shape.
        self.steps_per_epoch = n_train // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n_train} training images is less than one batch")
        self.n_train = n_train
        self.total_steps = self.steps_per_epoch * config.epochs
        peak = optimizers.peak_learning_rate(config.optimizer, config.learning_rate)
        self.learning_rate = optimizers.schedule(
            config.schedule,
            peak,
            self.total_steps,
            round(config.warmup_epochs * self.steps_per_epoch),
        )
        model = models.create(config.model, config.seed)
        tx = optimizers.create(config.optimizer, self.learning_rate)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        self.graphdef, self.state = nnx.split((model, optimizer))

        # The dataset lives on the device; steps gather their batches there by index.
        self.train_images = jax.device_put(dataset.train.images[:n_train])
        self.train_labels = jax.device_put(dataset.train.labels[:n_train])
        self.test_batches = self._eval_batches(dataset.test, config.eval_batch_size)
        self.n_test = len(dataset.test.labels)
        self.base_key = jax.random.key(config.seed)
        self._train_step = jax.jit(self._make_train_step(), donate_argnums=0)
        self._evaluate_batch = jax.jit(self._make_evaluate_batch())

    @staticmethod
    def _eval_batches(split: data_lib.Split, batch_size: int) -> tuple[jax.Array, ...]:
        """The split padded to whole batches, with a mask that is 0 on the padding."""
        n = len(split.labels)
        n_batches = math.ceil(n / batch_size)
        pad = n_batches * batch_size - n
        images = np.pad(split.images, ((0, pad), (0, 0), (0, 0)))
        labels = np.pad(split.labels, (0, pad))
        mask = np.arange(n_batches * batch_size) < n
        shape = (n_batches, batch_size)
        return tuple(jax.device_put(a.reshape(shape + a.shape[1:])) for a in (images, labels, mask))

    def _make_train_step(self) -> Callable[..., Any]:
        graphdef, spec, max_shift = self.graphdef, self.dataset.spec, self.config.max_shift

        def loss_fn(model, images, labels, rngs):
            logits = model(images, train=True, rngs=rngs)
            return cross_entropy(logits, labels).mean(), logits

        def train_step(state, totals, images, labels, indices, step_number, base_key):
            """One optimizer step on ``images[indices]``; ``totals`` accumulates the summed
            loss and number of correct predictions."""
            key = jax.random.fold_in(base_key, step_number)
            shift_key, dropout_key = jax.random.split(key)
            x = random_shift(shift_key, images[indices].astype(jnp.float32), max_shift)
            x = normalize(x, spec.mean, spec.std)
            y = labels[indices]
            model, optimizer = nnx.merge(graphdef, state)
            grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
            (loss, logits), grads = grad_fn(model, x, y, nnx.Rngs(dropout=dropout_key))
            optimizer.update(model, grads)
            correct = jnp.sum(jnp.argmax(logits, -1) == y)
            return nnx.state((model, optimizer)), totals + jnp.stack([loss * len(y), correct])

        return train_step

    def _make_evaluate_batch(self) -> Callable[..., Any]:
        graphdef, spec = self.graphdef, self.dataset.spec

        def evaluate_batch(state, totals, images, labels, mask):
            """Adds the summed loss and correct predictions of the unmasked examples."""
            model, _ = nnx.merge(graphdef, state)
            logits = model(normalize(images, spec.mean, spec.std), train=False)
            loss = jnp.sum(cross_entropy(logits, labels) * mask)
            correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
            return totals + jnp.stack([loss, correct])

        return evaluate_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Batch indices ``(steps_per_epoch, batch_size)`` of ``epoch``, from (seed, epoch)."""
        rng = np.random.default_rng([self.config.seed, epoch])
        order = rng.permutation(self.n_train)[: self.steps_per_epoch * self.config.batch_size]
        return order.reshape(self.steps_per_epoch, self.config.batch_size).astype(np.int32)

    def train_epoch(
        self, epoch: int, on_progress: Callable[[int, Metrics], None] | None = None
    ) -> Metrics:
        """Runs epoch ``epoch`` (0-based); returns its mean loss, accuracy and timings.

        ``on_progress(steps_done, running_metrics)`` is called every ``progress_every``
        steps with the totals of the step before, so that it never makes the device wait.
        """
        order = jax.device_put(self.epoch_order(epoch))
        first_step = epoch * self.steps_per_epoch
        start = time.perf_counter()
        totals = jnp.zeros(2)
        for i in range(self.steps_per_epoch):
            self.state, new_totals = self._train_step(
                self.state,
                totals,
                self.train_images,
                self.train_labels,
                order[i],
                first_step + i,
                self.base_key,
            )
            if on_progress is not None and i % self.progress_every == 0 and i > 0:
                # The totals of steps 0..i-1: step i is queued behind them, so no stall.
                on_progress(*self._running(i, totals, start))
            totals = new_totals
        loss_sum, correct = np.asarray(totals)  # Waits for the last step.
        seconds = time.perf_counter() - start
        if on_progress is not None:
            on_progress(*self._running(self.steps_per_epoch, totals, start))
        images = self.steps_per_epoch * self.config.batch_size
        return {
            "train_loss": float(loss_sum / images),
            "train_accuracy": float(correct / images),
            "train_seconds": seconds,
            "images_per_second": images / seconds,
        }

    def _running(self, steps: int, totals: jax.Array, start: float) -> tuple[int, Metrics]:
        loss_sum, correct = np.asarray(totals)
        images = steps * self.config.batch_size
        return steps, {
            "loss": float(loss_sum / images),
            "accuracy": float(correct / images),
            "images_per_second": images / (time.perf_counter() - start),
        }

    def evaluate(self) -> Metrics:
        """Mean loss and accuracy on the whole test set."""
        images, labels, mask = self.test_batches
        totals = jnp.zeros(2)
        for i in range(len(images)):
            totals = self._evaluate_batch(self.state, totals, images[i], labels[i], mask[i])
        loss, accuracy = np.asarray(totals) / self.n_test
        return {"test_loss": float(loss), "test_accuracy": float(accuracy)}

    def params(self) -> dict[str, Any]:
        """The model's parameters as a nested dict of NumPy arrays."""
        model, _ = nnx.merge(self.graphdef, self.state)
        return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


class Checkpoints:
    """Orbax checkpoints of the trainer state, one per epoch, numbered by completed epochs."""

    def __init__(self, directory: Path):
        self.manager = ocp.CheckpointManager(
            directory.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2)
        )

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def save(self, epochs_done: int, state: nnx.State) -> None:
        self.manager.save(epochs_done, args=ocp.args.StandardSave(nnx.to_pure_dict(state)))
        self.manager.wait_until_finished()

    def restore(self, epochs_done: int, state: nnx.State) -> nnx.State:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
        restored = self.manager.restore(epochs_done, args=ocp.args.StandardRestore(target))
        nnx.replace_by_pure_dict(state, restored)
        return state

    def close(self) -> None:
        self.manager.close()


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]:.4f}  acc {task.fields[accuracy]:.2%}  "
            "{task.fields[images_per_second]:,.0f} img/s"
        ),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def read_metrics(path: Path) -> list[Metrics]:
    """The records of a ``metrics.jsonl`` file, one per line."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(history: list[Metrics], path: Path, title: str) -> None:
    """Loss and accuracy (train and test) against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [m["train_loss"] for m in history], "o-", label="train")
    ax_loss.plot(epochs, [m["test_loss"] for m in history], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.plot(epochs, [100 * m["train_accuracy"] for m in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * m["test_accuracy"] for m in history], "o-", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_and_evaluate(
    config: Config, dataset: data_lib.Dataset | None = None, console: Console | None = None
) -> tuple[Trainer, list[Metrics]]:
    """Trains ``config.epochs`` epochs (continuing from the last checkpoint with
    ``config.resume``), evaluating, logging, checkpointing and plotting after each epoch.

    Returns the trainer (for its final state) and the history of per-epoch metrics.
    """
    console = console or Console()
    dataset = dataset or data_lib.load(config.dataset, config.data_dir)
    workdir = Path(config.workdir)
    metrics_path = workdir / "metrics.jsonl"
    checkpoint_dir = workdir / "checkpoints"
    if not config.resume:
        # A fresh run replaces the previous one rather than mixing their records.
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        metrics_path.unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)

    trainer = Trainer(config, dataset)
    checkpoints = Checkpoints(checkpoint_dir) if config.checkpoints else None
    start_epoch = 0
    if config.resume and checkpoints is not None and checkpoints.latest_epoch() is not None:
        start_epoch = checkpoints.latest_epoch()
        trainer.state = checkpoints.restore(start_epoch, trainer.state)
        console.print(f"Resumed from the checkpoint after epoch {start_epoch}.")
    # Records of epochs after the checkpoint belong to an interrupted run: drop them.
    history = [m for m in read_metrics(metrics_path) if m["epoch"] <= start_epoch]
    metrics_path.write_text("".join(json.dumps(m) + "\n" for m in history))
    elapsed = history[-1]["elapsed_seconds"] if history else 0.0

    title = f"{config.model} / {config.optimizer} on {config.dataset}"
    with _progress_bar(config.progress) as progress:
        for epoch in range(start_epoch, config.epochs):
            task = progress.add_task(
                f"epoch {epoch + 1}/{config.epochs}",
                total=trainer.steps_per_epoch,
                loss=0.0,
                accuracy=0.0,
                images_per_second=0.0,
            )

            def update(steps: int, running: Metrics, task=task) -> None:
                progress.update(task, completed=steps, **running)

            start = time.perf_counter()
            record: Metrics = {"epoch": epoch + 1}
            record |= trainer.train_epoch(epoch, update)
            record |= trainer.evaluate()
            record["seconds"] = time.perf_counter() - start
            elapsed += record["seconds"]
            record["elapsed_seconds"] = elapsed
            record["learning_rate"] = float(
                trainer.learning_rate((epoch + 1) * trainer.steps_per_epoch - 1)
            )
            history.append(record)
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if checkpoints is not None:
                checkpoints.save(epoch + 1, trainer.state)
            progress.console.print(
                f"epoch {epoch + 1:3d}  train loss {record['train_loss']:.4f}  "
                f"test loss {record['test_loss']:.4f}  "
                f"test accuracy {record['test_accuracy']:.2%}  "
                f"{record['images_per_second']:,.0f} img/s  {record['seconds']:.1f} s"
            )
    if checkpoints is not None:
        checkpoints.close()
    if history:
        plot_curves(history, workdir / "curves.png", title)
    return trainer, history


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
