"""The run: steps, held-out evaluations, ``metrics.jsonl``, checkpoints, stops and resume.

Every ``eval_every`` steps (and at the last) a record goes to the progress bar and to
``WORKDIR/metrics.jsonl``: the mean training loss since the last record, the held-out loss,
tokens per second (training steps only) and the learning rate. Every ``checkpoint_every`` steps
(whatever ``eval_every`` is), at the last step and when SIGTERM or SIGINT asks the run to stop,
a checkpoint is written (:class:`examples.common.checkpoints.Checkpoints`: atomic, checked by
sha256 when read back, a damaged one moved aside).

A run on a work directory that holds checkpoints continues from the newest intact one (the
settings must be the same; SOAP's blocks are re-laid where the mesh spreads them over another
number of devices), as a requeued job's same command should; ``restart`` starts over,
and the previous run's files stay until the new run's first checkpoint
(:class:`examples.common.workdir.Workdir`). The windows of every step come from the seed, so a
resumed run, even after ``kill -9``, gives the records and params of an unbroken one bit for bit.

One step is in flight at a time: the loop waits for a step before it dispatches the next, so a
signal stops the run after the step running when it came (with several processes, all stop
after the same step: they compare the signals they received before every step).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import adam_jax
from examples.common import distributed
from examples.common import metrics as metrics_lib
from examples.common.checkpoints import Checkpoints, as_flag
from examples.common.errors import Interrupted, NonFiniteError
from examples.common.interrupts import StopRequests
from examples.common.metrics import Metrics
from examples.common.workdir import Workdir
from examples.lm.data import Corpus
from examples.lm.train import Trainer, relayout_blocks

KEEP_CHECKPOINTS = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Where a run keeps its files and how it reports; none of it changes the results."""

    workdir: Path | None = None  # None: no files, no checkpoints
    checkpoint_every: int = 500
    # Start over even if workdir holds checkpoints (else the run continues from them).
    restart: bool = False
    report: Callable[[Metrics], None] = lambda record: None
    stepped: Callable[[int], None] = lambda step: None  # each step's number once dispatched
    warn: Callable[[str], None] = print
    note: Callable[[str], None] = print  # what the run does with the work directory


class Run:
    """One training run of ``trainer`` on ``corpus``; :meth:`train` returns its records, and
    :attr:`records` holds them however the run ended."""

    def __init__(self, trainer: Trainer, corpus: Corpus, options: RunOptions):
        self.trainer, self.corpus, self.options = trainer, corpus, options
        config = trainer.config
        # What a resume must match; the mesh may change (each array is read into this run's
        # layout, whatever the layout it was written from), and so may the number of devices
        # that an optimizer's blocks are spread over, whose vectors are laid out by device: they
        # are re-laid (_relaying). So may the micro-batches a step is split into: as the mesh,
        # they change where the activations are kept and the gradients' rounding, not the step;
        # and so may the dtype of the products (checkpoints written before it was a setting
        # resume too).
        settings = dataclasses.asdict(config)
        del settings["mesh"], settings["zero1"], settings["grad_accumulation"]
        del settings["model"]["compute_dtype"]
        if trainer.block_devices is not None:
            settings["block_devices"] = trainer.block_devices
        self.settings = json_safe(settings)
        self.session_start = time.perf_counter()
        self.elapsed_before = 0.0
        eval_count = -(-config.eval_windows // trainer.mesh.size) * trainer.mesh.size
        self.held_out = corpus.windows(corpus.held_out_starts(eval_count), held_out=True)
        self.starts = corpus.batches(config.seed, config.steps, config.batch_size)
        self.records: list[Metrics] = []
        self.step = 0
        self.saved_step: int | None = None
        self.checkpoints: Checkpoints | None = None
        self.workdir: Workdir | None = None
        if options.workdir is not None:
            self.workdir = Workdir(options.workdir)
            self.checkpoints = Checkpoints(
                self.workdir.checkpoints_path, KEEP_CHECKPOINTS, options.warn, describe_setting
            )

    def begin(self) -> None:
        """Continues from the newest intact checkpoint of the work directory, unless
        ``restart``; a run that starts over where a previous run left files writes aside until
        its first checkpoint."""
        if self.workdir is None or self.checkpoints is None:
            return
        config = self.trainer.config
        restored = None
        if not self.options.restart:
            tree = self.trainer.checkpoint_tree()
            conversions = (
                {"block_devices": self._relaying} if "block_devices" in self.settings else {}
            )
            restored = self.checkpoints.restore_latest(tree, self.settings, conversions)
        if restored is not None:
            self.trainer.restore(restored.tree)
            self.step = self.saved_step = restored.step
            self.elapsed_before = restored.run["elapsed_seconds"]
            records = metrics_lib.read(self.workdir.metrics_path, self.options.warn)
            self.records = [record for record in records if record["step"] <= self.step]
            if len(self.records) < restored.run["records"]:
                self.options.warn(
                    f"{self.workdir.metrics_path} holds {len(self.records)} of the "
                    f"{restored.run['records']} records up to step {self.step}: the curves have "
                    "a gap"
                )
            self.options.note(f"resuming from step {self.step} of {config.steps}")
        elif not distributed.everywhere(not self.workdir.holds_a_run()):
            workdir = self.workdir
            self.checkpoints.move(workdir.staging / "checkpoints", workdir.stage)
            first = min(self.options.checkpoint_every, config.steps)
            self.options.note(
                f"starting over: the previous run's files in {workdir.path} stay until this "
                f"run's first checkpoint (step {first})"
            )
        self._write_metrics()

    def _relaying(self, was: Any, now: Any) -> Callable[[Any], Any]:
        """The conversion of a checkpoint whose optimizer spread its blocks over ``was``
        devices, this run over ``now``: its factors and bases re-laid (one line says so).
        Raises ValueError where they cannot be (8-bit or 4-bit codes)."""
        if not isinstance(was, int) or isinstance(was, bool) or was < 1:
            raise ValueError(f"the checkpoint records {was!r} devices")
        # Refuses before any array is read.
        relaid_state = relayout_blocks(self.trainer.config, was, now)

        def relay(tree: Any) -> Any:
            self.options.note(f"re-laying SOAP's blocks from {was} devices to {now}")
            return self.trainer.relaid(tree, relaid_state)

        return relay

    def train(self) -> list[Metrics]:
        """Trains to the last step (continuing first from the work directory's checkpoints, as
        :meth:`begin` does); then, or when anything stops it, closes the checkpoints: a run
        trains once."""
        try:
            return self._train()
        finally:
            # Nothing of orbax's may still talk to the other processes when they shut down.
            if self.checkpoints is not None:
                self.checkpoints.close()

    def _train(self) -> list[Metrics]:
        config, trainer = self.trainer.config, self.trainer
        self.begin()
        seconds, steps_timed = 0.0, 0
        with StopRequests() as stop:
            while self.step < config.steps:
                begin = time.perf_counter()
                windows = self.corpus.windows(self.starts[self.step])
                # The step in flight; a signal that came while it ran is seen now.
                trainer.wait()
                if (signum := self._stop_request(stop)) is not None:
                    self._stop(signum)
                trainer.step(windows)
                self.step += 1
                self.options.stepped(self.step)
                steps_timed += 1
                last = self.step == config.steps
                if self.step % config.eval_every == 0 or last:
                    loss_sum = trainer.take_loss_sum()  # waits for the step
                    seconds += time.perf_counter() - begin
                    self._record(loss_sum, steps_timed, seconds)
                    seconds, steps_timed = 0.0, 0
                else:
                    seconds += time.perf_counter() - begin
                if self.step % self.options.checkpoint_every == 0 or last:
                    self._checkpoint()
        return self.records

    def _record(self, loss_sum: float, steps_timed: int, seconds: float) -> None:
        config = self.trainer.config
        since = self.records[-1]["step"] if self.records else 0
        train_loss = loss_sum / (self.step - since)
        if not np.isfinite(train_loss):
            raise NonFiniteError(
                f"the training loss stopped being finite between steps {since} and {self.step}; "
                "rerun with a lower --learning-rate"
            )
        record: Metrics = {
            "step": self.step,
            "train_loss": train_loss,
            "held_out_loss": self.trainer.loss(self.held_out),
            "tokens_per_second": steps_timed * config.batch_size * config.model.seq_len / seconds,
            "learning_rate": float(self.trainer.schedule(self.step - 1)),
        }
        if (mfu := self.trainer.model_flops_utilization(record["tokens_per_second"])) is not None:
            record["model_flops_utilization"] = mfu
        self.records.append(record)
        self._write_metrics()
        self.options.report(record)

    def _write_metrics(self) -> None:
        if self.workdir is None or not distributed.is_primary():
            return
        try:
            metrics_lib.write(self.workdir.metrics_path, self.records)
        except OSError as error:  # the old file is intact; the next write has these records
            self.options.warn(f"could not write {self.workdir.metrics_path} ({error})")

    def _checkpoint(self) -> None:
        if self.checkpoints is None or self.workdir is None or self.step == self.saved_step:
            return
        run = {
            "settings": self.settings,
            "records": len(self.records),
            "logged_step": self.records[-1]["step"] if self.records else 0,
            "elapsed_seconds": self.elapsed_before + time.perf_counter() - self.session_start,
        }
        if self.checkpoints.save(self.step, self.trainer.checkpoint_tree(), run):
            self.saved_step = self.step
            if self.workdir.staged:  # the first checkpoint of a run that started over
                self.checkpoints.move(self.workdir.path / "checkpoints", self.workdir.commit)

    def optimizer_share(self) -> dict[str, float]:
        """The optimizer's share of a training step: its update timed alone
        (:meth:`~examples.lm.train.Trainer.optimizer_seconds`) against the step time of the
        last record (from its tokens a second); written to ``WORKDIR/optimizer_share.json``."""
        config = self.trainer.config
        tokens_a_step = config.batch_size * config.model.seq_len
        step_seconds = tokens_a_step / self.records[-1]["tokens_per_second"]
        optimizer_seconds = self.trainer.optimizer_seconds()
        share = {
            "optimizer_seconds": optimizer_seconds,
            "step_seconds": step_seconds,
            "share": optimizer_seconds / step_seconds,
        }
        if self.workdir is not None and distributed.is_primary():
            path = self.workdir.metrics_path.parent / "optimizer_share.json"
            try:
                path.write_text(json.dumps(share) + "\n")
            except OSError as error:
                self.options.warn(f"could not write {path} ({error})")
        return share

    def _stop_request(self, stop: StopRequests) -> int | None:
        """The signal that stops the run before its next step, if any: with several
        processes, the first any of them received (a collective, before every step, so that
        all stop after the same step)."""
        return distributed.first_signal(stop.signum)

    def _stop(self, signum: int) -> None:
        self._checkpoint()
        saved = self.saved_step
        checkpoint = (
            None if self.checkpoints is None or saved is None else self.checkpoints.path(saved)
        )
        raise Interrupted(signum, self.step, f"of {self.trainer.config.steps}", checkpoint, saved)


def describe_share(share: dict[str, float]) -> str:
    """:meth:`Run.optimizer_share` as one line: ``optimizer 2.1 ms of 30.5 ms a step (7%)``."""
    return (
        f"optimizer {share['optimizer_seconds'] * 1e3:.3g} ms of "
        f"{share['step_seconds'] * 1e3:.3g} ms a step ({share['share']:.0%})"
    )


def describe_setting(name: str, value: Any) -> str:
    """A setting as a resume's mismatch names it: as its flag, and the devices of the blocks
    as the mesh sets them."""
    if name != "block_devices":
        return as_flag(name, value)
    if value is None:
        return "no record of the devices SOAP's blocks are spread over"
    return f"SOAP's blocks spread over {value} device{'s' * (value != 1)} (--mesh)"


def json_safe(value: Any) -> Any:
    """``value`` as the JSON a checkpoint keeps, for comparing settings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def state_bytes_per_param(trainer: Trainer) -> float:
    return adam_jax.state_bytes(trainer.opt_state) / trainer.param_count
