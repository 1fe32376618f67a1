"""The training loop: a small library behind ``python -m examples.mnist``.

Speed on CPU comes from a few choices. The model and optimizer are split once into a
``GraphDef`` and a pure ``State``, and the step is a plain ``jax.jit`` over the state with the
state donated, which avoids ``nnx.jit``'s per-call graph traversal and reuses the parameter
buffers in place. Batches are gathered on device, by index, from a dataset copied to the device
once. Metrics are summed on device and read back one step late, so reading them never stalls
the pipeline. (Steps are not fused with ``lax.scan``: XLA:CPU runs convolutions inside a loop
an order of magnitude slower than at the top level, and dispatch is cheap next to a step.)

Reproducibility: the shuffle of epoch ``e`` is drawn from ``(seed, e)`` and the augmentation
and dropout keys from ``(seed, step)``, and a checkpoint holds the epoch's running sums next to
the model and optimizer, so a run resumed from any checkpoint, in the middle of an epoch or at
its end, replays exactly the computation of an uninterrupted one.

Data parallelism (:mod:`~examples.mnist.parallel`): the step is the same function on a mesh of
``Config.devices`` devices, each batch split over them. The batches, the shifts and the dropout
masks are drawn for the whole batch, as on one device (JAX's random numbers do not depend on
how their array is split), so runs on any number of devices and processes compute the same
steps, up to the order of the sums over the devices.

Faults: SIGTERM or SIGINT stops the run after the current step with a checkpoint
(:mod:`~examples.mnist.interrupts`); damaged checkpoints and full disks are handled in
:mod:`~examples.mnist.checkpoints`; ``Config.skip_nonfinite`` skips steps whose gradient is
not finite, and a run never writes a checkpoint whose parameters are not finite.
"""

from __future__ import annotations

import collections
import dataclasses
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
from flax import nnx
from jax.sharding import Mesh
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from examples.mnist import data as data_lib
from examples.mnist import distributed, models, optimizers, parallel
from examples.mnist import metrics as metrics_lib
from examples.mnist.checkpoints import Checkpoints
from examples.mnist.config import Config, check_batch_split
from examples.mnist.errors import (
    CheckpointError,
    DeviceError,
    Interrupted,
    NonFiniteError,
    TrainingError,
)
from examples.mnist.interrupts import StopRequests

Metrics = metrics_lib.Metrics
# Per-epoch sums carried from step to step on the device: summed loss, correct predictions and
# images of the steps that were applied (a skipped step adds nothing).
SUMS = ("loss_sum", "correct", "images")
# Computations dispatched and not finished, at most: enough to keep the devices busy. XLA:CPU
# deadlocks in the all-reduce of a multi-device step when hundreds of them are queued (jax
# 0.10.2, 8 host devices on 2 cores: a whole epoch of MLP steps dispatched at once hangs).
MAX_IN_FLIGHT = 4


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


def _all_finite(state: nnx.State) -> jax.Array:
    leaves = jax.tree.leaves(nnx.to_pure_dict(state))
    floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats]))


class Trainer:
    """A model, its optimizer and the compiled functions that train and evaluate it.

    ``state`` is the pure ``nnx.State`` of ``(model, optimizer)`` and ``running`` the epoch's
    sums (:data:`SUMS`) and skip counters; they are what changes from step to step, and what
    checkpoints hold. They live on ``mesh`` (default: :func:`parallel.data_mesh` of
    ``config.devices``), laid out by :attr:`layout`.

    Raises :class:`~examples.mnist.errors.DeviceError` if the devices asked for are not
    there or cannot split a batch evenly.
    """

    def __init__(self, config: Config, dataset: data_lib.Dataset, mesh: Mesh | None = None):
        self.config = config
        self.dataset = dataset
        self.layout = parallel.DataParallel(mesh or parallel.data_mesh(config.devices))
        try:
            check_batch_split(config.batch_size, self.layout.devices)
        except ValueError as err:
            raise DeviceError(str(err)) from err
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
            optimizers.schedule_name(config.optimizer, config.schedule),
            peak,
            self.total_steps,
            round(config.warmup_epochs * self.steps_per_epoch),
        )
        # The rate of every step, for the records: reading it never waits on the device.
        self.learning_rates = np.asarray(
            jax.jit(jax.vmap(self.learning_rate))(jnp.arange(self.total_steps))
        )
        model = models.create(config.model, config.seed, config.param_dtype)
        tx = optimizers.with_low_precision(
            optimizers.create(config.optimizer, self.learning_rate),
            config.low_precision,
            config.seed,
        )
        if config.skip_nonfinite:
            tx = optax.apply_if_finite(tx, config.max_consecutive_skips)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        self.num_params = sum(x.size for x in jax.tree.leaves(params))
        self.param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        self.state_bytes = sum(x.nbytes for x in jax.tree.leaves(optimizer.opt_state))
        self.graphdef, state = nnx.split((model, optimizer))
        layout = self.layout
        state_shardings = layout.state_shardings(state, tx, params, config.shard_optimizer)
        self.state = jax.tree.map(layout.put, state, state_shardings)
        self.running = self.zero_running()

        # The dataset lives on every device; steps gather their batches there by index.
        self.train_images = layout.put(dataset.train.images[:n_train], layout.replicated)
        self.train_labels = layout.put(dataset.train.labels[:n_train], layout.replicated)
        self.test_batches = self._eval_batches(dataset.test, config.eval_batch_size)
        self.n_test = len(dataset.test.labels)
        running_shardings = jax.tree.map(lambda _: layout.replicated, self.running)
        self._train_step = jax.jit(
            self._make_train_step(),
            donate_argnums=0,
            out_shardings=(state_shardings, running_shardings),
        )
        self._evaluate_batch = jax.jit(self._make_evaluate_batch(), out_shardings=layout.replicated)
        self._all_finite = jax.jit(_all_finite, out_shardings=layout.replicated)
        self._steps_in_flight = _InFlight()

    def zero_running(self) -> dict[str, jax.Array]:
        sums = {name: np.zeros((), np.float32) for name in SUMS}
        counters = {name: np.zeros((), np.int32) for name in ("skipped", "consecutive_skips")}
        return self.layout.replicate(sums | counters)

    def _eval_batches(self, split: data_lib.Split, batch_size: int) -> tuple[jax.Array, ...]:
        """The split padded to whole batches, with a mask that is 0 on the padding; a batch
        is split over the devices, its size rounded up to a multiple of their number."""
        batch_size = math.ceil(batch_size / self.layout.devices) * self.layout.devices
        n = len(split.labels)
        n_batches = math.ceil(n / batch_size)
        pad = n_batches * batch_size - n
        images = np.pad(split.images, ((0, pad), (0, 0), (0, 0)))
        labels = np.pad(split.labels, (0, pad))
        mask = np.arange(n_batches * batch_size) < n
        shape = (n_batches, batch_size)
        return tuple(
            self.layout.put(a.reshape(shape + a.shape[1:]), self.layout.batches)
            for a in (images, labels, mask)
        )

    def _make_train_step(self) -> Callable[..., Any]:
        graphdef, spec, max_shift = self.graphdef, self.dataset.spec, self.config.max_shift
        seed, skip_nonfinite = self.config.seed, self.config.skip_nonfinite
        layout, shard_optimizer = self.layout, self.config.shard_optimizer

        def loss_fn(model, images, labels, rngs):
            logits = model(images, train=True, rngs=rngs)
            return cross_entropy(logits, labels).mean(), logits

        def train_step(state, running, images, labels, indices, step_number):
            """One optimizer step on ``images[indices]``; adds to the ``running`` sums."""
            key = jax.random.fold_in(jax.random.key(seed), step_number)
            shift_key, dropout_key = jax.random.split(key)
            x = layout.gather(images, indices).astype(jnp.float32)
            x = normalize(random_shift(shift_key, x, max_shift), spec.mean, spec.std)
            y = layout.gather(labels, indices)
            model, optimizer = nnx.merge(graphdef, state)
            grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
            (loss, logits), grads = grad_fn(model, x, y, nnx.Rngs(dropout=dropout_key))
            if shard_optimizer:
                grads = layout.zero_sliced(grads)
            optimizer.update(model, grads)
            if skip_nonfinite:
                # optax.apply_if_finite's counters: this step's verdict, the total, the streak.
                opt_state = optimizer.opt_state
                applied = opt_state.last_finite[...]
                skipped = opt_state.total_notfinite[...]
                consecutive = opt_state.notfinite_count[...]
            else:
                applied = jnp.array(True)
                skipped, consecutive = running["skipped"], running["consecutive_skips"]
            correct = jnp.sum(jnp.argmax(logits, -1) == y)
            added = {"loss_sum": loss * len(y), "correct": correct, "images": len(y)}
            sums = {name: running[name] + jnp.where(applied, added[name], 0) for name in SUMS}
            return nnx.state((model, optimizer)), sums | {
                "skipped": skipped,
                "consecutive_skips": consecutive,
            }

        return train_step

    def _make_evaluate_batch(self) -> Callable[..., Any]:
        graphdef, spec, name = self.graphdef, self.dataset.spec, self.config.optimizer

        def evaluate_batch(state, totals, images, labels, mask):
            """Adds the summed loss and correct predictions of the unmasked examples."""
            model, optimizer = nnx.merge(graphdef, state)
            params = nnx.state(model, nnx.Param)
            nnx.update(model, optimizers.evaluation_params(name, optimizer.opt_state, params))
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

    def epoch_order_on_devices(self, epoch: int) -> jax.Array:
        """:meth:`epoch_order` on the devices, each batch split over them."""
        return self.layout.put(self.epoch_order(epoch), self.layout.batches)

    def step(self, indices: jax.Array, step_number: int) -> None:
        """Dispatches the optimizer step ``step_number`` (0-based, counted from the start of
        training) on the batch ``indices``; returns at once, unless :data:`MAX_IN_FLIGHT`
        steps are still being computed."""
        self.state, self.running = self._train_step(
            self.state,
            self.running,
            self.train_images,
            self.train_labels,
            indices,
            step_number,
        )
        self._steps_in_flight.add(self.running["images"])

    def train_epoch(self, epoch: int) -> Metrics:
        """Runs epoch ``epoch`` (0-based) whole, without records or checkpoints; returns its
        mean loss and accuracy and its timings."""
        order = self.epoch_order_on_devices(epoch)
        self.running = self.zero_running()
        start = time.perf_counter()
        for i in range(self.steps_per_epoch):
            self.step(order[i], epoch * self.steps_per_epoch + i)
        means = epoch_means(jax.device_get(self.running))  # Waits for the last step.
        seconds = time.perf_counter() - start
        images = self.steps_per_epoch * self.config.batch_size
        return means | {"train_seconds": seconds, "images_per_second": images / seconds}

    def evaluate(self) -> Metrics:
        """Mean loss and accuracy on the whole test set."""
        images, labels, mask = self.test_batches
        totals = self.layout.put(np.zeros(2, np.float32), self.layout.replicated)
        in_flight = _InFlight()
        for i in range(len(images)):
            totals = self._evaluate_batch(self.state, totals, images[i], labels[i], mask[i])
            in_flight.add(totals)
        loss, accuracy = np.asarray(totals) / self.n_test
        return {"test_loss": float(loss), "test_accuracy": float(accuracy)}

    def state_is_finite(self) -> bool:
        """Whether every floating-point array of the model and optimizer is finite."""
        return bool(self._all_finite(self.state))

    def params(self) -> dict[str, Any]:
        """The model's parameters as a nested dict of NumPy arrays."""
        model, _ = nnx.merge(self.graphdef, self.state)
        return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


class _InFlight:
    """The outputs of the computations dispatched last; :meth:`add` waits for the oldest
    beyond :data:`MAX_IN_FLIGHT` to be computed (waits, no transfer)."""

    def __init__(self) -> None:
        self.outputs: collections.deque[jax.Array] = collections.deque()

    def add(self, output: jax.Array) -> None:
        self.outputs.append(output)
        if len(self.outputs) > MAX_IN_FLIGHT:
            self.outputs.popleft().block_until_ready()


def epoch_means(sums: dict[str, Any], since: dict[str, Any] | None = None) -> Metrics:
    """Mean training loss and accuracy of the steps summed in ``sums`` (after ``since``);
    ``None`` where no step was applied."""
    window = {name: float(sums[name]) - float(since[name] if since else 0) for name in SUMS}
    images = window["images"]
    return {
        "train_loss": window["loss_sum"] / images if images else None,
        "train_accuracy": window["correct"] / images if images else None,
    }


def _progress_bar(enabled: bool, console: Console) -> Progress:
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


def read_metrics(path: Path, console: Console | None = None) -> list[Metrics]:
    """The records of a ``metrics.jsonl`` file; unreadable lines are reported on ``console``."""
    return metrics_lib.read(path, _warner(console or Console()))


def _warner(console: Console) -> Callable[[str], None]:
    def warn(message: str) -> None:
        # Not markup: messages quote paths and shapes such as float32[784, 512].
        console.print(
            f"warning: {message}", style="yellow", markup=False, highlight=False, soft_wrap=True
        )

    return warn


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


class _Run:
    """One call of :func:`train_and_evaluate`: the loop with its records, checkpoints, stops
    and resume.

    Invariant that makes resumes exact: every record with ``step <= s`` is appended before the
    checkpoint of step ``s`` is written and every later one after it, so resuming from ``s``
    keeps the records up to ``s`` and recomputes the others exactly as they were.
    """

    def __init__(
        self,
        config: Config,
        trainer: Trainer,
        checkpoints: Checkpoints | None,
        metrics_path: Path,
        console: Console,
        progress: Progress,
    ):
        self.config = config
        self.trainer = trainer
        self.checkpoints = checkpoints
        self.metrics_path = metrics_path
        self.console = console
        self.warn = _warner(console)
        self.progress = progress
        self.records: list[Metrics] = []
        self.step = 0  # Optimizer steps done.
        self.saved_step: int | None = None  # The step of the newest checkpoint.
        # The host copy of the running sums at the last step record, and its step.
        self.logged = jax.device_get(trainer.zero_running())
        self.logged_step = 0
        self.checkpoint_every = config.checkpoint_every or trainer.steps_per_epoch
        self.elapsed_before = 0.0  # Seconds of training before this session (resumes).
        self.session_start = time.perf_counter()
        # The progress-bar task of the epoch, when this session started it and at which step.
        self.task: Any = None
        self.epoch_clock = (self.session_start, 0)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.session_start

    def _checkpoint_tree(self) -> dict[str, Any]:
        return {
            "train_state": nnx.to_pure_dict(self.trainer.state),
            "running": self.trainer.running,
            "logged": self.logged,
        }

    def resume(self) -> None:
        """Continues from the newest intact checkpoint, if there is one."""
        expected_records = 0
        restored = None
        if self.checkpoints is not None:
            restored = self.checkpoints.restore_latest(
                self._checkpoint_tree(), self.config.resume_settings()
            )
        if restored is None:
            self.console.print("No checkpoint to resume from: training from the start.")
        else:
            nnx.replace_by_pure_dict(self.trainer.state, restored.tree["train_state"])
            self.trainer.running = restored.tree["running"]
            self.logged = jax.device_get(restored.tree["logged"])
            self.step = self.saved_step = restored.step
            self.logged_step = restored.run["logged_step"]
            self.elapsed_before = restored.run["elapsed_seconds"]
            expected_records = restored.run["records"]
            self.console.print(f"Resumed from the checkpoint of step {self.step} ({self.where()}).")
        try:
            records = metrics_lib.read(self.metrics_path, self.warn)
        except OSError as err:
            raise TrainingError(f"cannot read {self.metrics_path}: {err}") from err
        self.records = [m for m in records if m["step"] <= self.step]
        if len(self.records) < expected_records:
            self.warn(
                f"{self.metrics_path} holds {len(self.records)} of the {expected_records} "
                f"records written up to step {self.step} (a write failed): the curves have a gap"
            )
        self.write_metrics()

    def where(self) -> str:
        epoch, offset = divmod(self.step, self.trainer.steps_per_epoch)
        if offset == 0 and epoch > 0:
            return f"end of epoch {epoch}"
        return f"epoch {epoch + 1}, {offset} of {self.trainer.steps_per_epoch} steps done"

    def train(self, stop: StopRequests) -> None:
        # A signal during the last evaluation finds the run complete: nothing to stop.
        while self.step < self.trainer.total_steps:
            self._train_epoch(self.step // self.trainer.steps_per_epoch, stop)
        if self.checkpoints is not None and self.saved_step != self.step:
            # Earlier failed writes cost a few steps on a resume; this one, the result.
            raise CheckpointError(
                f"the final checkpoint (step {self.step}) could not be written; the newest is "
                f"of step {self.saved_step}. Free some space and run again with --resume, "
                "which redoes the steps after it"
            )

    def _train_epoch(self, epoch: int, stop: StopRequests) -> None:
        trainer, config = self.trainer, self.config
        steps_per_epoch = trainer.steps_per_epoch
        first = epoch * steps_per_epoch
        offset = self.step - first
        if offset == 0:
            trainer.running = trainer.zero_running()
            self.logged = jax.device_get(trainer.running)
            self.logged_step = first
        order = trainer.epoch_order_on_devices(epoch)
        # The first step of a session compiles for seconds: say so, not "loss 0.0000".
        self.task = self.progress.add_task(
            f"epoch {epoch + 1}/{config.epochs}",
            total=steps_per_epoch,
            completed=offset,
            status="compiling the step" if self.task is None else "",
        )
        self.progress.refresh()
        start = time.perf_counter()
        self.epoch_clock = (start, offset)
        for i in range(offset, steps_per_epoch):
            if (signum := self._stop_request(stop, i)) is not None:
                self._stop(signum)
            if self.step % self.checkpoint_every == 0 and self.step not in (0, self.saved_step):
                self._checkpoint(jax.device_get(trainer.running))
            previous = trainer.running
            trainer.step(order[i], self.step)
            if i % config.log_every == 0 and self.step > self.logged_step:
                # The sums of the steps before step i, which is queued behind them: no stall.
                self._log(jax.device_get(previous), self.step)
            self.step += 1
        sums = jax.device_get(trainer.running)  # Waits for the last step.
        train_seconds = time.perf_counter() - start
        if self.step > self.logged_step:
            self._log(sums, self.step)
        record: Metrics = {"kind": "epoch", "step": self.step, "epoch": epoch + 1}
        record |= epoch_means(sums)
        record |= trainer.evaluate()
        previous_epochs = [m for m in self.records if m["kind"] == "epoch"]
        elapsed = self.elapsed()
        record |= {
            "skipped_steps": int(sums["skipped"]),
            # Wall time since the previous epoch's record, across resumes; training time and
            # speed of this session's part of the epoch.
            "seconds": elapsed - (previous_epochs[-1]["elapsed_seconds"] if previous_epochs else 0),
            "train_seconds": train_seconds,
            "images_per_second": (steps_per_epoch - offset) * config.batch_size / train_seconds,
            "elapsed_seconds": elapsed,
            "learning_rate": float(trainer.learning_rates[self.step - 1]),
        }
        self.records.append(record)
        skipped = f", {record['skipped_steps']} steps skipped" if config.skip_nonfinite else ""
        self.progress.console.print(
            f"epoch {epoch + 1:3d}  train loss {_format(record['train_loss'])}  "
            f"test loss {record['test_loss']:.4f}  "
            f"test accuracy {record['test_accuracy']:.2%}  "
            f"{record['images_per_second']:,.0f} img/s  {record['seconds']:.1f} s{skipped}",
            highlight=False,
            soft_wrap=True,
        )
        if self.step % self.checkpoint_every == 0 or self.step == trainer.total_steps:
            self._checkpoint(sums)
        else:
            self.write_metrics()

    def _stop_request(self, stop: StopRequests, i: int) -> int | None:
        """The signal that asks the run to stop before step ``i`` of the epoch, if any.

        With several processes all must stop after the same step, and a signal reaches each
        at its own moment: they compare notes every ``log_every`` steps (a collective, so
        not at every step), where the loop waits for the device anyway.
        """
        if jax.process_count() == 1:
            return stop.signum
        if i % self.config.log_every:
            return None
        return distributed.first_signal(stop.signum)

    def _log(self, sums: dict[str, Any], step: int) -> None:
        """Appends the step record of the steps since the last one; updates the progress bar;
        stops the run if the loss stopped being finite or too many steps in a row were
        skipped."""
        self._check_finite(sums, step)
        steps_per_epoch = self.trainer.steps_per_epoch
        record: Metrics = {"kind": "step", "step": step, "epoch": step / steps_per_epoch}
        record |= epoch_means(sums, since=self.logged)
        record |= {
            "learning_rate": float(self.trainer.learning_rates[step - 1]),
            "skipped_steps": int(sums["skipped"]),
            "elapsed_seconds": self.elapsed(),
        }
        self.records.append(record)
        self.logged, self.logged_step = sums, step
        in_epoch = step - (step - 1) // steps_per_epoch * steps_per_epoch
        means = epoch_means(sums)
        epoch_start, offset = self.epoch_clock
        images_per_second = (
            (in_epoch - offset) * self.config.batch_size / (time.perf_counter() - epoch_start)
        )
        skipped = f"  skipped {record['skipped_steps']}" if self.config.skip_nonfinite else ""
        self.progress.update(
            self.task,
            completed=in_epoch,
            status=f"loss {means['train_loss'] or 0.0:.4f}  "
            f"acc {means['train_accuracy'] or 0.0:.2%}  {images_per_second:,.0f} img/s{skipped}",
        )

    def _check_finite(self, sums: dict[str, Any], step: int) -> None:
        if self.saved_step is None:
            last = "there is no checkpoint"
        else:
            last = f"the last checkpoint is step {self.saved_step}"
        if self.config.skip_nonfinite:
            streak = int(sums["consecutive_skips"])
            if streak >= self.config.max_consecutive_skips:
                raise NonFiniteError(
                    f"{streak} steps in a row up to step {step} had a NaN or Inf gradient "
                    f"(--max-consecutive-skips {self.config.max_consecutive_skips}); "
                    f"stopping: {last}. A lower --learning-rate may help"
                )
        elif not math.isfinite(float(sums["loss_sum"])):
            raise NonFiniteError(
                f"the training loss stopped being finite between steps {self.logged_step} and "
                f"{step}, so the parameters are no longer usable; {last}. Rerun with a lower "
                "--learning-rate, or with --skip-nonfinite to skip steps whose gradient has a "
                "NaN or an Inf"
            )

    def _checkpoint(self, sums: dict[str, Any]) -> None:
        """Writes the records and then the checkpoint of ``self.step``."""
        steps_per_epoch = self.trainer.steps_per_epoch
        in_epoch = self.step % steps_per_epoch
        if in_epoch % self.config.log_every == 0 and in_epoch and self.step > self.logged_step:
            self._log(sums, self.step)
        self._check_finite(sums, self.step)
        self.write_metrics()
        if self.checkpoints is None:
            return
        if not self.trainer.state_is_finite():
            raise NonFiniteError(
                f"the parameters or optimizer state are not finite at step {self.step}; the "
                f"checkpoint was not written, the last one is step {self.saved_step}. Rerun "
                "with a lower --learning-rate"
            )
        run = {
            "settings": self.config.resume_settings(),
            "records": len(self.records),
            "logged_step": self.logged_step,
            "elapsed_seconds": self.elapsed(),
        }
        if self.checkpoints.save(self.step, self._checkpoint_tree(), run):
            self.saved_step = self.step

    def _stop(self, signum: int) -> None:
        """Checkpoints the step reached and raises :class:`Interrupted`."""
        if self.step != self.saved_step and self.step > 0:
            self._checkpoint(jax.device_get(self.trainer.running))
        checkpoint = None
        if self.checkpoints is not None and self.saved_step is not None:
            checkpoint = self.checkpoints.path(self.saved_step)
        raise Interrupted(signum, self.step, self.where(), checkpoint, self.saved_step)

    def write_metrics(self) -> None:
        if not distributed.is_primary():
            return
        try:
            metrics_lib.write(self.metrics_path, self.records)
        except OSError as err:
            # The old file is intact, and the next write includes these records again.
            self.warn(f"could not write {self.metrics_path} ({err}); it is rewritten later")


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _prepare_workdir(config: Config, workdir: Path) -> None:
    """Clears a previous run's outputs unless resuming (by the first process; the others wait
    for it)."""
    if not distributed.is_primary():
        distributed.barrier("workdir prepared")
        return
    try:
        if not config.resume:
            # A fresh run replaces the previous one rather than mixing their records.
            for name in ("checkpoints", "damaged_checkpoints"):
                shutil.rmtree(workdir / name, ignore_errors=True)
            for name in ("metrics.jsonl", "curves.png"):
                (workdir / name).unlink(missing_ok=True)
        workdir.mkdir(parents=True, exist_ok=True)
        metrics_lib.remove_partial_writes(workdir / "metrics.jsonl")
    except OSError as err:
        raise TrainingError(f"cannot prepare the work directory {workdir}: {err}") from err
    distributed.barrier("workdir prepared")


def train_and_evaluate(
    config: Config, dataset: data_lib.Dataset | None = None, console: Console | None = None
) -> tuple[Trainer, list[Metrics]]:
    """Trains ``config.epochs`` epochs (continuing from the newest intact checkpoint with
    ``config.resume``), with step records every ``config.log_every`` steps, an evaluation
    after each epoch, checkpoints every ``config.checkpoint_every`` steps (default: at epoch
    ends) and at the end, and ``curves.png``.

    Returns the trainer (for its final state) and the per-epoch records. Raises
    :class:`~examples.mnist.errors.Interrupted` after a checkpoint when SIGTERM or SIGINT
    arrives, and other :class:`~examples.mnist.errors.TrainingError` when the run cannot go
    on (no intact checkpoint, settings that differ from the checkpoint's, non-finite values).
    """
    if not distributed.is_primary():
        # The first process reports; the others would print the same.
        console, config = Console(quiet=True), dataclasses.replace(config, progress=False)
    console = console or Console()
    dataset = dataset or data_lib.load(config.dataset, config.data_dir)
    workdir = Path(config.workdir)
    _prepare_workdir(config, workdir)
    with StopRequests() as stop:
        trainer = Trainer(config, dataset)
        n, params, state = trainer.num_params, trainer.param_bytes, trainer.state_bytes
        updates = "" if config.low_precision == "none" else f", {config.low_precision}"
        console.print(
            f"{n:,} parameters ({config.param_dtype}{updates}), bytes per parameter: "
            f"{params / n:.2f} params + {state / n:.2f} optimizer state "
            f"= {(params + state) / n:.2f}",
            soft_wrap=True,
        )
        checkpoints = None
        if config.checkpoints:
            checkpoints = Checkpoints(
                workdir / "checkpoints", config.keep_checkpoints, _warner(console)
            )
        try:
            with _progress_bar(config.progress, console) as progress:
                metrics_path = workdir / "metrics.jsonl"
                run = _Run(config, trainer, checkpoints, metrics_path, console, progress)
                if config.resume:
                    run.resume()  # Changes nothing on disk if it fails.
                else:
                    run.write_metrics()
                try:
                    run.train(stop)
                finally:
                    # Whatever stopped the run, the records so far and their curves.
                    run.write_metrics()
                    _plot(run.records, workdir / "curves.png", config, run.warn)
        finally:
            if checkpoints is not None:
                checkpoints.close()
    return trainer, [m for m in run.records if m["kind"] == "epoch"]


def _plot(records: list[Metrics], path: Path, config: Config, warn: Callable[[str], None]) -> None:
    if not (distributed.is_primary() and any(m["kind"] == "epoch" for m in records)):
        return
    try:
        plot_curves(records, path, f"{config.model} / {config.optimizer} on {config.dataset}")
    except OSError as err:
        warn(f"could not write {path} ({err})")


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
