"""The steps of :mod:`~examples.mnist.step`, compiled for speed: :class:`Trainer`.

Speed on CPU comes from a few choices. The model and optimizer are split once into a
``GraphDef`` and a pure ``State``, and the step is a plain ``jax.jit`` over the state with the
state donated, which avoids ``nnx.jit``'s per-call graph traversal and reuses the parameter
buffers in place. Batches are gathered on device, by index, from a dataset copied to the device
once. Metrics are summed on device and read back one step late, so reading them never stalls
the pipeline. (Steps are not fused with ``lax.scan``: XLA:CPU runs convolutions inside a loop
an order of magnitude slower than at the top level, and dispatch is cheap next to a step.) On
a GPU or TPU the params are packed in one buffer per dtype (:func:`packs_params`): the host
then hands a step a few buffers instead of four a param.

Reproducibility: the shuffle of epoch ``e`` is drawn from ``(seed, e)`` and the augmentation
and dropout keys from ``(seed, step)``, so that a run resumed from a checkpoint
(:mod:`~examples.mnist.loop`) replays exactly the computation of an uninterrupted one.

Data parallelism (:mod:`~examples.mnist.parallel`): the step is the same function on a mesh of
``Config.devices`` devices, each batch split over them. The batches, the shifts and the dropout
masks are drawn for the whole batch, as on one device (JAX's random numbers do not depend on
how their array is split), so runs on any number of devices and processes compute the same
steps, up to the order of the sums over the devices.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from examples.common.errors import DeviceError
from examples.common.metrics import Metrics
from examples.mnist import data as data_lib
from examples.mnist import optimizers, parallel
from examples.mnist.augment import normalize, random_shift
from examples.mnist.config import Config, check_batch_split
from examples.mnist.step import create_model_and_optimizer, eval_step, train_step

# Per-epoch sums carried from step to step on the device: summed loss, correct predictions and
# images of the steps that were applied (a skipped step adds nothing).
SUMS = ("loss_sum", "correct", "images")
# Computations dispatched and not finished, at most: enough to keep the devices busy. XLA:CPU
# deadlocks in the all-reduce of a multi-device step when hundreds of them are queued (jax
# 0.10.2, 8 host devices on 2 cores: a whole epoch of MLP steps dispatched at once hangs).
MAX_IN_FLIGHT = 4


def _all_finite(state: nnx.State) -> jax.Array:
    leaves = jax.tree.leaves(nnx.to_pure_dict(state))
    floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats]))


def packs_params(config: Config, platform: str) -> bool:
    """Whether a run of ``config`` on ``platform`` packs its params in one buffer per dtype
    (:class:`adam_jax.flat.FlatModel`): ``--flat-params on``, or ``auto`` on a GPU or TPU,
    where the host's handling of each buffer of a step's call costs more than the step of a
    small param (docs/speed.md, "Many leaves"), for an optimizer that steps packed params as it
    steps the model's own (not with 8-bit or 4-bit codes, which a buffer takes in blocks across
    params, nor for the small params that keep float32 moments alone). Raises ValueError for
    ``on`` with an optimizer that cannot step packed params."""
    if config.flat_params == "off" or (config.flat_params == "auto" and platform == "cpu"):
        return False
    problem, packed_bytes = _packed_state_bytes(config)
    if config.flat_params == "on":
        if problem:
            raise ValueError(f"flat_params on: {problem}; use flat_params off (or auto)")
        return True
    return problem is None and packed_bytes == _state_bytes(config, flat=False)


def packing_problem(config: Config) -> str | None:
    """Why ``config``'s optimizer cannot step packed params, or None: it needs each param in
    its shape (SOAP's factors, MARS's choice by dimensions), or its evaluation reads its
    state per param (schedule-free averages)."""
    return _packed_state_bytes(config)[0]


def _packed_state_bytes(config: Config) -> tuple[str | None, int | None]:
    """Why ``config``'s optimizer cannot step packed params (:func:`packing_problem`) and
    None, or None and the bytes of its state on them."""
    if config.optimizer in optimizers.SCHEDULE_FREE:
        return f"{config.optimizer} evaluates its average, which it keeps per param", None
    try:  # what refuses packed params does so as it initializes its state
        return None, _state_bytes(config, flat=True)
    except ValueError as error:
        if "FlatParams" not in str(error):
            raise
        return str(error).split(":")[0], None


def _state_bytes(config: Config, flat: bool) -> int:
    """The bytes of the optimizer state of ``config``, its params packed or not (abstract)."""

    def create() -> nnx.Optimizer:
        return create_model_and_optimizer(config, optax.constant_schedule(0.0), flat)[1]

    state = nnx.state(nnx.eval_shape(create))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


class Trainer:
    """A model, its optimizer and the compiled functions that train and evaluate it.

    ``state`` is the pure ``nnx.State`` of ``(model, optimizer)`` and ``running`` the epoch's
    sums (:data:`SUMS`) and skip counters; they are what changes from step to step, and what
    checkpoints hold. They live on ``mesh`` (default: :func:`parallel.data_mesh` of
    ``config.devices``), laid out by :attr:`layout`.

    Raises :class:`~examples.common.errors.DeviceError` if the devices asked for are not
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
        self.flat_params = packs_params(config, self.layout.mesh.devices.flat[0].platform)
        model, optimizer = create_model_and_optimizer(config, self.learning_rate, self.flat_params)
        # A moment kept in several arrays (adam_jax's 8-bit, 4-bit and factored storages) is
        # one Variable in nnx.Optimizer's state, whose value, a NamedTuple at first, becomes a
        # mapping of its fields at the first update: the structure of the state would change
        # after the first step (the compiled step's shardings, donation, checkpoints). With a
        # Variable per array, as optax's own state has, the updates keep the structure.
        optimizer.opt_state = nnx.data(jax.tree.map(nnx.OptArray, nnx.as_pure(optimizer.opt_state)))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        self.num_params = sum(x.size for x in jax.tree.leaves(params))
        self.param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        self.state_bytes = sum(x.nbytes for x in jax.tree.leaves(optimizer.opt_state))
        # adam_jax.offload_state keeps the small arrays (biases' moments, the count) on the device.
        self.host_state_bytes = sum(
            x.nbytes
            for x in jax.tree.leaves(optimizer.opt_state)
            if getattr(x.sharding, "memory_kind", None) == "pinned_host"
        )
        self.graphdef, state = nnx.split((model, optimizer))
        layout = self.layout
        state_shardings = layout.state_shardings(
            state, optimizer.tx, params, config.shard_optimizer
        )
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
        """:func:`~examples.mnist.step.train_step` (or, with ``--shard-optimizer``,
        :meth:`~examples.mnist.parallel.DataParallel.sharded_train_step`) as a pure function of
        the state, for ``jax.jit``: on the batch of the given indices, augmented, with the
        epoch's sums."""
        graphdef, spec, max_shift = self.graphdef, self.dataset.spec, self.config.max_shift
        seed, skip_nonfinite = self.config.seed, self.config.skip_nonfinite
        layout = self.layout
        # ZeRO-1 lays the gradients out as the sliced moments before the update.
        step_fn = layout.sharded_train_step if self.config.shard_optimizer else train_step

        def step_on_state(state, running, images, labels, indices, step_number):
            """One optimizer step on ``images[indices]``; adds to the ``running`` sums."""
            key = jax.random.fold_in(jax.random.key(seed), step_number)
            shift_key, dropout_key = jax.random.split(key)
            x = layout.gather(images, indices).astype(jnp.float32)
            x = normalize(random_shift(shift_key, x, max_shift), spec.mean, spec.std)
            y = layout.gather(labels, indices)
            model, optimizer = nnx.merge(graphdef, state)
            rngs = nnx.Rngs(dropout=dropout_key)
            loss, logits = step_fn(model, optimizer, x, y, rngs)
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
            added: dict[str, jax.Array | int] = {
                "loss_sum": loss * len(y),
                "correct": correct,
                "images": len(y),
            }
            sums = {name: running[name] + jnp.where(applied, added[name], 0) for name in SUMS}
            return nnx.state((model, optimizer)), sums | {
                "skipped": skipped,
                "consecutive_skips": consecutive,
            }

        return step_on_state

    def _make_evaluate_batch(self) -> Callable[..., Any]:
        graphdef, spec, name = self.graphdef, self.dataset.spec, self.config.optimizer

        def evaluate_batch(state, totals, images, labels, mask):
            """Adds the summed loss and correct predictions of the unmasked examples."""
            model, optimizer = nnx.merge(graphdef, state)
            params = nnx.state(model, nnx.Param)
            nnx.update(model, optimizers.evaluation_params(name, optimizer.opt_state, params))
            return totals + eval_step(model, normalize(images, spec.mean, spec.std), labels, mask)

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
        """The model's parameters as a nested dict of NumPy arrays (in their own shapes with
        :attr:`flat_params`)."""
        model, _ = nnx.merge(self.graphdef, self.state)
        if self.flat_params:
            model = model.to_module()
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
