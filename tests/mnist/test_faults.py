"""Faults the training program survives, in process: resumes from any checkpoint, damaged
checkpoints and metrics files, another run's checkpoints, full disks, SIGTERM and SIGINT, and
non-finite gradients. (The same faults through the command line, with real kills, are in
``test_crash_resume.py``.)"""

from __future__ import annotations

import dataclasses
import errno
import functools
import io
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from mnist_helpers import (
    Poisoned,
    Tiny,
    records_without_timing,
    state_arrays,
    synthetic_dataset,
    with_white_images,
)
from rich.console import Console

from examples.common import checkpoints, metrics
from examples.common.errors import CheckpointError, Interrupted, NonFiniteError
from examples.common.workdir import Workdir
from examples.mnist import data, models, train
from examples.mnist.config import Config

DATASET = synthetic_dataset(n_train=256, n_test=50)
STEPS = 16  # 2 epochs of 8 steps; a checkpoint every 2 steps.


@pytest.fixture(scope="module", autouse=True)
def _test_models() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.MODELS, "tiny", Tiny)
        patch.setitem(models.MODELS, "poisoned", Poisoned)
        yield


def make_config(workdir: Path, **changes: Any) -> Config:
    config = Config(
        model="tiny",
        epochs=2,
        batch_size=32,
        eval_batch_size=50,
        max_shift=1,
        checkpoint_every=2,
        keep_checkpoints=10,
        log_every=2,
        workdir=str(workdir),
        progress=False,
    )
    return dataclasses.replace(config, **changes)


def run(
    config: Config, dataset: data.Dataset = DATASET
) -> tuple[train.Trainer, list[train.Metrics], str]:
    """Trains; returns the trainer, the epoch records and what was printed."""
    out = io.StringIO()
    trainer, history = train.train_and_evaluate(config, dataset, Console(file=out, width=400))
    return trainer, history, out.getvalue()


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@dataclasses.dataclass(frozen=True)
class Pristine:
    """An uninterrupted run: its work directory, final state and records."""

    workdir: Path
    state: dict[str, Any]
    records: list[dict[str, Any]]

    def copy(self, destination: Path, keep_through: int = STEPS) -> Path:
        """A copy of the work directory without the checkpoints after ``keep_through``; its
        metrics.jsonl still has every record, as after a kill."""
        shutil.copytree(self.workdir, destination)
        for step in checkpoint_steps(destination):
            if step > keep_through:
                shutil.rmtree(destination / "checkpoints" / str(step))
        return destination


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    workdir = tmp_path_factory.mktemp("pristine") / "run"
    trainer, _, _ = run(make_config(workdir))
    assert checkpoint_steps(workdir) == list(range(2, STEPS + 1, 2))
    return Pristine(
        workdir, state_arrays(trainer.state), records_without_timing(workdir / "metrics.jsonl")
    )


def assert_same_state(trainer: train.Trainer, expected: dict[str, Any]) -> None:
    jax.tree.map(np.testing.assert_array_equal, state_arrays(trainer.state), expected)


def test_resume_in_the_middle_of_an_epoch_is_bit_identical(
    pristine: Pristine, tmp_path: Path
) -> None:
    """Step 10 is in epoch 2: the resumed run replays the rest of the epoch's batches, shifts
    and dropout, and its records, exactly. A torn last line of metrics.jsonl (from a writer
    killed mid-line) is ignored with a warning. (Resumes in epoch 1 are tested below.)"""
    workdir = pristine.copy(tmp_path / "run", keep_through=10)
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "step", "step": 2')
    # The same settings again (a requeued job's command): the run continues.
    trainer, history, out = run(make_config(workdir))
    assert "Resuming from step 10 of 16 (epoch 2, 2 of 8 steps done)." in out
    assert "(the last one is cut short)" in out
    assert_same_state(trainer, pristine.state)
    assert records_without_timing(workdir / "metrics.jsonl") == pristine.records
    assert [m["epoch"] for m in history] == [1, 2]


def test_metrics_reader_skips_what_is_not_a_record(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n[1, 2]\n{"no step": 0}\n\n{"step": 2}\n{"step": 3, "lo')
    warnings: list[str] = []
    assert metrics.read(path, warnings.append) == [{"step": 1}, {"step": 2}]
    assert warnings == [
        f"{path}: ignored line(s) 2-3, 6 that are not complete records (the last one is cut short)"
    ]
    assert metrics.read(tmp_path / "absent.jsonl") == []


def test_metrics_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails (here: the disk is full at fsync) leaves the old file whole and no
    temporary file; a later temporary file left by a kill is removed."""
    path = tmp_path / "metrics.jsonl"
    metrics.write(path, [{"step": 1}])

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        metrics.write(path, [{"step": 1}, {"step": 2}])
    assert metrics.read(path) == [{"step": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    (tmp_path / ".metrics.jsonl.x1y2.tmp").write_text('{"step": 1}\n{"st')
    metrics.remove_partial_writes(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomically_written_files_get_the_usual_mode(tmp_path: Path, umask: int) -> None:
    """``metrics.jsonl`` (and a downloaded data file, by the same helper) gets the mode of a
    file opened for writing, 0o666 less the umask, not the temporary file's private 0o600."""
    previous = os.umask(umask)
    try:
        metrics.write(tmp_path / "metrics.jsonl", [{"step": 1}])
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(previous)
    mode = (tmp_path / "metrics.jsonl").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777 == 0o666 & ~umask


def _largest_array_file(checkpoint: Path) -> Path:
    return max(
        (p for p in (checkpoint / "state").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )


def _flip_a_byte(checkpoint: Path) -> None:
    path = _largest_array_file(checkpoint)
    contents = bytearray(path.read_bytes())
    contents[len(contents) // 2] ^= 0xFF
    path.write_bytes(bytes(contents))


def _truncate(checkpoint: Path) -> None:
    path = _largest_array_file(checkpoint)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# Each kind of damage, and the checkpoint it is done to.
DAMAGE: dict[str, tuple[int, Callable[[Path], object]]] = {
    "corrupt array metadata": (16, lambda c: (c / "state" / "_METADATA").write_text("{not js")),
    "corrupt run record": (14, lambda c: (c / "run" / "metadata").write_text('{"settings": {')),
    "missing run record": (12, lambda c: shutil.rmtree(c / "run")),
    "missing array file": (10, lambda c: _largest_array_file(c).unlink()),
    "flipped byte in the arrays": (8, _flip_a_byte),
    "truncated array file": (6, _truncate),
}


def test_damaged_checkpoints_are_reported_and_the_newest_intact_one_used(
    pristine: Pristine, tmp_path: Path
) -> None:
    """Six checkpoints, each damaged differently: each is reported in one line naming the
    step, the reason and where it was moved; the run resumes from the intact step 4 (in
    epoch 1) and ends bit-identical to the uninterrupted run."""
    workdir = pristine.copy(tmp_path / "run")
    for step, damage in DAMAGE.values():
        damage(workdir / "checkpoints" / str(step))
    trainer, _, out = run(make_config(workdir, resume=True))
    lines = [line for line in out.splitlines() if "is damaged" in line]
    assert len(lines) == len(DAMAGE)
    damaged_dir = workdir.absolute() / "damaged_checkpoints"
    for line, (step, _) in zip(lines, DAMAGE.values(), strict=True):
        assert line.startswith(f"warning: checkpoint {step} is damaged (its ")
        assert line.endswith(f"); moved to {damaged_dir / str(step)}")
    assert "resuming from the newest intact checkpoint, step 4" in out
    assert "Resuming from step 4 of 16 (epoch 1, 4 of 8 steps done)." in out
    assert "Traceback" not in out
    assert_same_state(trainer, pristine.state)
    assert records_without_timing(workdir / "metrics.jsonl") == pristine.records
    assert checkpoint_steps(workdir) == list(range(2, STEPS + 1, 2))  # Written again.


@pytest.mark.parametrize(
    ("model", "stored", "wanted"),
    [
        (functools.partial(Tiny, hidden=32), "float32[16] in the", "float32[32] in this"),
        (functools.partial(Tiny, param_dtype=jnp.bfloat16), "float32[", "bfloat16["),
    ],
    ids=["other shapes", "other dtypes"],
)
def test_no_intact_checkpoint_is_an_error_that_changes_nothing(
    pristine: Pristine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    model: Callable[..., Tiny],
    stored: str,
    wanted: str,
) -> None:
    """Checkpoints of a model whose arrays differ from this one's are all unusable: the error
    names each step and the first array that differs, and moves nothing."""
    workdir = pristine.copy(tmp_path / "run")
    metrics_before = (workdir / "metrics.jsonl").read_bytes()
    monkeypatch.setitem(models.MODELS, "tiny", model)
    with pytest.raises(CheckpointError) as info:
        run(make_config(workdir, resume=True))
    message = str(info.value)
    assert message.startswith(
        f"no intact checkpoint in {workdir.absolute() / 'checkpoints'} (step 16: "
    )
    for step in range(2, STEPS + 1, 2):
        assert f"step {step}: " in message
    assert stored in message and wanted in message and "in this model" in message
    assert checkpoint_steps(workdir) == list(range(2, STEPS + 1, 2))
    assert not (workdir / "damaged_checkpoints").exists()
    assert (workdir / "metrics.jsonl").read_bytes() == metrics_before


@pytest.mark.parametrize(
    ("change", "was", "now"),
    [
        ({"optimizer": "adamw"}, "--optimizer adam", "--optimizer adamw"),
        ({"batch_size": 16}, "--batch-size 32", "--batch-size 16"),
        ({"model": "poisoned"}, "--model tiny", "--model poisoned"),
        ({"skip_nonfinite": True}, "no --skip-nonfinite", "--skip-nonfinite"),
        ({"train_limit": 128}, "no --train-limit", "--train-limit 128"),
        ({"moments": "4bit"}, "--moments default", "--moments 4bit"),
        ({"second_moment": "factored"}, "--second-moment default", "--second-moment factored"),
    ],
)
def test_resume_with_other_settings_is_refused(
    pristine: Pristine, tmp_path: Path, change: dict[str, Any], was: str, now: str
) -> None:
    workdir = pristine.copy(tmp_path / "run")
    with pytest.raises(CheckpointError) as info:
        run(make_config(workdir, resume=True, **change))
    assert str(info.value).startswith(
        f"cannot resume: the checkpoint of step 16 was written with {was}, this run has {now}."
    )
    assert checkpoint_steps(workdir) == list(range(2, STEPS + 1, 2))


def _fail_checkpoint_writes(
    monkeypatch: pytest.MonkeyPatch, steps: set[int], error: Exception
) -> None:
    """Makes orbax fail at the end of writing the arrays of the checkpoints of ``steps``, in
    their temporary directory, as a disk that fills up would."""
    original = ocp.StandardCheckpointHandler.async_save

    async def async_save(self: Any, directory: Any, *args: Any, **kwargs: Any) -> Any:
        futures = await original(self, directory, *args, **kwargs)
        if int(Path(directory).parent.name.split(".")[0]) in steps:
            for future in futures or ():
                future.result()
            raise error
        return futures

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)


def test_storage_errors_are_told_apart_from_bugs() -> None:
    assert checkpoints.is_storage_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    # What TensorStore, which writes orbax's arrays, raised when a disk filled up.
    assert checkpoints.is_storage_error(
        ValueError(
            'RESOURCE_EXHAUSTED: Error writing "a/0" in OCDBT database at local file "/x/": '
            "Failed to write 242927 bytes to file 11: No space left on device "
            "[os_error_code='28']"
        )
    )
    assert not checkpoints.is_storage_error(ValueError("Checkpoint for step 4 already exists."))
    assert not checkpoints.is_storage_error(TypeError("unhashable type: 'dict'"))


def test_full_disk_skips_checkpoints_and_training_goes_on(
    pristine: Pristine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The policy for a full disk: a checkpoint that finds too little free space is not
    attempted (step 4), one whose write fails is deleted (step 6); both are reported, training
    goes on and the older checkpoints stay intact. Only the final checkpoint is required: its
    failure ends the run with an error naming the newest checkpoint, from which a resume ends
    bit-identical to the uninterrupted run."""
    workdir = tmp_path / "run"
    disk_usage = shutil.disk_usage

    asked = []

    def nearly_full(path: Any) -> Any:
        # Each checkpoint asks once; that of step 4 (the 2nd) finds 1000 bytes free.
        asked.append(path)
        usage = disk_usage(path)
        return usage._replace(free=1000) if len(asked) == 2 else usage

    monkeypatch.setattr(checkpoints.shutil, "disk_usage", nearly_full)
    _fail_checkpoint_writes(
        monkeypatch, {6, STEPS}, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    )
    out = io.StringIO()
    with pytest.raises(CheckpointError) as info:
        train.train_and_evaluate(make_config(workdir), DATASET, Console(file=out, width=400))
    assert (
        "warning: could not write the checkpoint of step 4 (it needs about 0.1 MiB, 0.0 MiB "
        "are free); the newest checkpoint is step 2\n"
        "warning: could not write the checkpoint of step 6 (OSError: [Errno 28] No space left "
        "on device); the newest checkpoint is step 2\n"
    ) in out.getvalue()
    assert str(info.value) == (
        "the final checkpoint (step 16) could not be written; the newest is of step 14. Free "
        "some space and run again with --resume, which redoes the steps after it"
    )
    assert checkpoint_steps(workdir) == [2, *range(8, STEPS, 2)]
    assert ocp.utils.tmp_checkpoints(workdir / "checkpoints") == []
    monkeypatch.undo()

    trainer, _, out = run(make_config(workdir, resume=True))
    assert "Resuming from step 14 of 16" in out
    assert_same_state(trainer, pristine.state)
    assert records_without_timing(workdir / "metrics.jsonl") == pristine.records


def test_sigint_stops_after_the_step_with_a_checkpoint(
    pristine: Pristine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during step 4 (0-based): step 4 completes, a checkpoint of the 5 steps done is
    written, and the resumed run ends bit-identical to the uninterrupted one. (SIGTERM, the
    same path, is sent to the command line in test_crash_resume.py.)"""
    signum = signal.SIGINT
    workdir = tmp_path / "run"
    step = train.Trainer.step

    def step_then_signal(self: train.Trainer, indices: jax.Array, step_number: int) -> None:
        step(self, indices, step_number)
        if step_number == 4:
            signal.raise_signal(signum)

    monkeypatch.setattr(train.Trainer, "step", step_then_signal)
    handler_before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as info:
        run(make_config(workdir))
    name = signal.Signals(signum).name
    assert str(info.value) == (
        f"stopped by {name} after step 5 (epoch 1, 5 of 8 steps done); "
        f"checkpoint: {workdir.absolute() / 'checkpoints' / '5'}"
    )
    assert info.value.exit_status == 128 + signum
    assert checkpoint_steps(workdir) == [2, 4, 5]
    assert signal.getsignal(signum) is handler_before
    monkeypatch.undo()

    trainer, _, _ = run(make_config(workdir, resume=True))
    assert_same_state(trainer, pristine.state)
    assert records_without_timing(workdir / "metrics.jsonl") == pristine.records


def _poisoned_steps(trainer: train.Trainer, white: np.ndarray) -> list[int]:
    """The 0-based steps whose batch holds one of the ``white`` images."""
    return [
        epoch * trainer.steps_per_epoch + i
        for epoch in range(trainer.config.epochs)
        for i, batch in enumerate(trainer.epoch_order(epoch))
        if np.isin(batch, white).any()
    ]


WHITE = np.array([5, 77, 200])


def test_skip_nonfinite_skips_and_counts_the_bad_steps(tmp_path: Path) -> None:
    dataset = with_white_images(DATASET, WHITE)
    config = make_config(tmp_path / "run", model="poisoned", max_shift=0, skip_nonfinite=True)
    trainer, history, out = run(config, dataset)
    poisoned = _poisoned_steps(trainer, WHITE)
    assert len(poisoned) >= 4
    first_epoch = sum(step < 8 for step in poisoned)
    assert [m["skipped_steps"] for m in history] == [first_epoch, len(poisoned)]
    assert f"{first_epoch} steps skipped" in out
    steps = [m for m in metrics.read(tmp_path / "run" / "metrics.jsonl") if m["kind"] == "step"]
    assert [m["skipped_steps"] for m in steps] == [
        sum(p < m["step"] for p in poisoned) for m in steps
    ]
    assert trainer.state_is_finite()
    assert all(np.isfinite(m["train_loss"]) for m in history)


def test_without_skipping_a_nonfinite_loss_stops_the_run(tmp_path: Path) -> None:
    dataset = with_white_images(DATASET, WHITE)
    config = make_config(tmp_path / "run", model="poisoned", max_shift=0)
    with pytest.raises(
        NonFiniteError, match="the training loss stopped being finite between steps"
    ):
        run(config, dataset)
    first_poisoned = _poisoned_steps(train.Trainer(config, dataset), WHITE)[0]
    # No checkpoint holds the poisoned parameters.
    assert all(step <= first_poisoned for step in checkpoint_steps(tmp_path / "run"))


def test_too_many_skips_in_a_row_stop_the_run(tmp_path: Path) -> None:
    dataset = with_white_images(DATASET, np.arange(len(DATASET.train.labels)))
    config = make_config(
        tmp_path / "run",
        model="poisoned",
        max_shift=0,
        skip_nonfinite=True,
        max_consecutive_skips=2,
    )
    with pytest.raises(
        NonFiniteError,
        match=r"^2 steps in a row up to step 2 had a NaN or Inf gradient "
        r"\(--max-consecutive-skips 2\); stopping: there is no checkpoint\.",
    ):
        run(config, dataset)
    assert checkpoint_steps(tmp_path / "run") == []


def _previous_and_staged_runs(workdir: Path) -> Workdir:
    """A work directory with a previous run's files, and a new run's written aside."""
    for name in ("checkpoints/10", "damaged_checkpoints/12"):
        (workdir / name).mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("old\n")
    (workdir / "curves.png").write_text("old")
    directory = Workdir(workdir)
    assert directory.holds_a_run()
    directory.stage()
    (directory.checkpoints_path / "2").mkdir(parents=True)
    directory.metrics_path.write_text("new\n")
    return directory


def _listing(workdir: Path) -> list[str]:
    return sorted(str(path.relative_to(workdir)) for path in workdir.rglob("*"))


OLD_RUN = ["checkpoints", "checkpoints/10", "curves.png", "damaged_checkpoints",
           "damaged_checkpoints/12", "metrics.jsonl"]  # fmt: skip


@pytest.mark.parametrize("done", range(4))
def test_a_commit_interrupted_anywhere_is_finished_by_the_next_run(tmp_path: Path, done: int):
    """A run that started over replaces the previous run's files at its first checkpoint; a
    crash after ``done`` of the commit's steps leaves what the next run (whichever its flags)
    takes as committed."""
    staged = _previous_and_staged_runs(tmp_path)
    steps = [
        lambda: (staged.staging / "COMMITTING").touch(),
        lambda: (tmp_path / "checkpoints").rename(staged.staging / "replaced_checkpoints"),
        lambda: staged.checkpoints_path.rename(tmp_path / "checkpoints"),
    ]
    for step in steps[:done]:
        step()
    Workdir(tmp_path)
    if done == 0:  # not marked: the new run never saved, and the previous one is whole
        assert _listing(tmp_path) == OLD_RUN
        assert (tmp_path / "metrics.jsonl").read_text() == "old\n"
    else:
        assert _listing(tmp_path) == ["checkpoints", "checkpoints/2", "metrics.jsonl"]
        assert (tmp_path / "metrics.jsonl").read_text() == "new\n"


def test_a_commit_replaces_the_previous_run(tmp_path: Path) -> None:
    staged = _previous_and_staged_runs(tmp_path)
    # Untouched while the new run writes aside.
    assert [name for name in _listing(tmp_path) if not name.startswith(".restart")] == OLD_RUN
    staged.commit()
    assert _listing(tmp_path) == ["checkpoints", "checkpoints/2", "metrics.jsonl"]
    assert staged.metrics_path == tmp_path / "metrics.jsonl"
