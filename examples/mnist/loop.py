"""The run: :func:`train_and_evaluate` trains the epochs of a :class:`~examples.mnist.config.
Config` with a :class:`~examples.mnist.trainer.Trainer`, keeps its records, writes its
checkpoints, stops when asked and resumes.

A run on a work directory that holds checkpoints continues from the newest intact one, as a
requeued job's same command should; ``Config.restart`` starts over, and the previous run's files
stay until the new run's first checkpoint (:class:`examples.common.workdir.Workdir`).

Reproducibility: a checkpoint holds the epoch's running sums next to the model and optimizer,
and the batches and random keys of a step depend only on the seed, the epoch and the step
(:mod:`~examples.mnist.trainer`), so a run resumed from any checkpoint, in the middle of an
epoch or at its end, replays exactly the computation of an uninterrupted one.

Faults: SIGTERM or SIGINT stops the run after the current step with a checkpoint
(:mod:`~examples.common.interrupts`); damaged checkpoints and full disks are handled in
:mod:`~examples.common.checkpoints`; ``Config.skip_nonfinite`` skips steps whose gradient is
not finite, and a run never writes a checkpoint whose parameters are not finite.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from rich.console import Console
from rich.progress import Progress

from examples.common import distributed
from examples.common import metrics as metrics_lib
from examples.common.checkpoints import Checkpoints
from examples.common.errors import CheckpointError, Interrupted, NonFiniteError, TrainingError
from examples.common.interrupts import StopRequests
from examples.common.metrics import Metrics
from examples.common.workdir import Workdir
from examples.mnist import console as console_lib
from examples.mnist import data as data_lib
from examples.mnist.config import Config
from examples.mnist.plots import plot_curves
from examples.mnist.trainer import Trainer, epoch_means


def train_and_evaluate(
    config: Config, dataset: data_lib.Dataset | None = None, console: Console | None = None
) -> tuple[Trainer, list[Metrics]]:
    """Trains ``config.epochs`` epochs (continuing from the newest intact checkpoint in
    ``config.workdir`` unless ``config.restart``), with step records every
    ``config.log_every`` steps, an evaluation after each epoch, checkpoints every
    ``config.checkpoint_every`` steps (default: at epoch ends) and at the end, and
    ``curves.png``.

    Returns the trainer (for its final state) and the per-epoch records. Raises
    :class:`~examples.common.errors.Interrupted` after a checkpoint when SIGTERM or SIGINT
    arrives, and other :class:`~examples.common.errors.TrainingError` when the run cannot go
    on (no intact checkpoint, settings that differ from the checkpoint's, non-finite values).
    """
    if not distributed.is_primary():
        # The first process reports; the others would print the same.
        console, config = Console(quiet=True), dataclasses.replace(config, progress=False)
    console = console or Console()
    dataset = dataset or data_lib.load(config.dataset, config.data_dir)
    workdir = Workdir(Path(config.workdir))
    with StopRequests() as stop:
        trainer = Trainer(config, dataset)
        console_lib.print_size(console, trainer)
        checkpoints = None
        if config.checkpoints:
            checkpoints = Checkpoints(
                workdir.checkpoints_path, config.keep_checkpoints, console_lib.warner(console)
            )
        run: _Run | None = None
        try:
            with console_lib.progress_bar(config.progress, console) as progress:
                run = _Run(config, trainer, checkpoints, workdir, console, progress)
                run.begin()  # Changes nothing on disk if it fails.
                try:
                    run.train(stop)
                finally:
                    # Whatever stopped the run, the records so far and their curves.
                    run.write_metrics()
                    curves = workdir.metrics_path.parent / "curves.png"
                    _plot(run.records, curves, config, run.warn)
                # A run without checkpoints replaces the previous run's files when complete.
                workdir.commit()
        finally:
            if run is not None:
                run.checkpoints_close()
    assert run is not None
    return trainer, [m for m in run.records if m["kind"] == "epoch"]


def _plot(records: list[Metrics], path: Path, config: Config, warn: Callable[[str], None]) -> None:
    if not (distributed.is_primary() and any(m["kind"] == "epoch" for m in records)):
        return
    try:
        plot_curves(records, path, f"{config.model} / {config.optimizer} on {config.dataset}")
    except OSError as err:
        warn(f"could not write {path} ({err})")


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
        workdir: Workdir,
        console: Console,
        progress: Progress,
    ):
        self.config = config
        self.trainer = trainer
        self.checkpoints = checkpoints
        self.workdir = workdir
        self.console = console
        self.warn = console_lib.warner(console)
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

    def _resume_settings(self) -> dict[str, object]:
        """The config's resume settings and whether the params are packed, which fixes the
        state's structure (``--flat-params auto`` packs them on a GPU or TPU only)."""
        packed = "on" if self.trainer.flat_params else "off"
        return self.config.resume_settings() | {"flat_params": packed}

    def begin(self) -> None:
        """Continues from the newest intact checkpoint, unless ``config.restart``; a run that
        starts over where a previous run left files writes aside until its first checkpoint
        (without checkpoints, until it ends)."""
        expected_records = 0
        restored = None
        if self.checkpoints is not None and not self.config.restart:
            restored = self.checkpoints.restore_latest(
                self._checkpoint_tree(), self._resume_settings()
            )
        if restored is not None:
            nnx.replace_by_pure_dict(self.trainer.state, restored.tree["train_state"])
            self.trainer.running = restored.tree["running"]
            self.logged = jax.device_get(restored.tree["logged"])
            self.step = self.saved_step = restored.step
            self.logged_step = restored.run["logged_step"]
            self.elapsed_before = restored.run["elapsed_seconds"]
            expected_records = restored.run["records"]
            self.console.print(
                f"Resuming from step {self.step} of {self.trainer.total_steps} ({self.where()})."
            )
            try:
                records = metrics_lib.read(self.workdir.metrics_path, self.warn)
            except OSError as err:
                raise TrainingError(f"cannot read {self.workdir.metrics_path}: {err}") from err
            self.records = [m for m in records if m["step"] <= self.step]
            if len(self.records) < expected_records:
                self.warn(
                    f"{self.workdir.metrics_path} holds {len(self.records)} of the "
                    f"{expected_records} records written up to step {self.step} (a write "
                    "failed): the curves have a gap"
                )
        elif not distributed.everywhere(not self.workdir.holds_a_run()):
            if self.checkpoints is None:
                self.workdir.stage()
                until = "this run's end"
            else:
                self.checkpoints.move(self.workdir.staging / "checkpoints", self.workdir.stage)
                first = min(self.checkpoint_every, self.trainer.total_steps)
                until = f"this run's first checkpoint (step {first})"
            self.console.print(
                f"Starting over: the previous run's files in {self.workdir.path} stay until "
                f"{until}."
            )
        elif self.config.resume:
            self.console.print("No checkpoint to resume from: training from the start.")
        self.write_metrics()

    def checkpoints_close(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.close()

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
        console_lib.print_epoch(self.progress.console, record, config.skip_nonfinite)
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
        skipped = record["skipped_steps"] if self.config.skip_nonfinite else None
        status = console_lib.bar_status(means, images_per_second, skipped)
        self.progress.update(self.task, completed=in_epoch, status=status)

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
            "settings": self._resume_settings(),
            "records": len(self.records),
            "logged_step": self.logged_step,
            "elapsed_seconds": self.elapsed(),
        }
        if self.checkpoints.save(self.step, self._checkpoint_tree(), run):
            self.saved_step = self.step
            if self.workdir.staged:  # the first checkpoint of a run that started over
                self.checkpoints.move(self.workdir.path / "checkpoints", self.workdir.commit)

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
        path = self.workdir.metrics_path
        try:
            metrics_lib.write(path, self.records)
        except OSError as err:
            # The old file is intact, and the next write includes these records again.
            self.warn(f"could not write {path} ({err}); it is rewritten later")
