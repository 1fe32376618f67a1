"""A run's folder: ``metrics.jsonl``, ``checkpoints/`` and ``curves.png``.

The same command run again on a folder that holds checkpoints continues from the newest intact
one (what a scheduler does when it requeues a job). A run that starts over (``--restart``, or a
folder holding a previous run's files but no checkpoint) replaces the previous run's files only
once it has a checkpoint of its own: until then it writes its records and checkpoints in
``.restart/`` (:meth:`Workdir.stage`), and its first checkpoint moves them into place
(:meth:`Workdir.commit`). A crash or a kill at any moment leaves the previous run intact, or the
new one committed: a commit marks itself first (``.restart/COMMITTING``), and whatever run comes
next finishes a marked commit, or deletes the unmarked ``.restart/`` of a run that never saved.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from examples.common import distributed
from examples.common import metrics as metrics_lib
from examples.common.errors import TrainingError

METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
DAMAGED = "damaged_checkpoints"
CURVES = "curves.png"
STAGING = ".restart"
COMMITTING = "COMMITTING"
REPLACED = "replaced_checkpoints"


def workdir_problem(path: Path) -> str | None:
    """What keeps ``path`` from being a run's folder, if anything: a file there, or, where the
    folder is not there yet, a file or an unwritable folder where it would be made."""
    if path.exists() and not path.is_dir():
        return f"--workdir {path} is a file, not a folder"
    existing = next(folder for folder in (path, *path.absolute().parents) if folder.exists())
    if not existing.is_dir():
        return f"--workdir {path}: cannot make the folder ({existing} is a file)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--workdir {path}: cannot write in {existing}"
    return None


class Workdir:
    """The folder ``path`` of a run; the first process changes files, the others wait for it.

    :attr:`metrics_path` and :attr:`checkpoints_path` are where the run writes now: in
    ``.restart/`` between :meth:`stage` and :meth:`commit`, else in ``path``.
    """

    def __init__(self, path: Path):
        self.path = path
        self.staged = False
        self._primary(self._prepare)
        distributed.barrier("workdir prepared")

    @property
    def staging(self) -> Path:
        return self.path / STAGING

    @property
    def metrics_path(self) -> Path:
        return (self.staging if self.staged else self.path) / METRICS

    @property
    def checkpoints_path(self) -> Path:
        return (self.staging if self.staged else self.path) / CHECKPOINTS

    def holds_a_run(self) -> bool:
        """Whether a previous run left files here (records, checkpoints, damaged ones)."""
        for name in (CHECKPOINTS, DAMAGED):
            folder = self.path / name
            if folder.is_dir() and any(folder.iterdir()):
                return True
        return (self.path / METRICS).exists()

    def stage(self) -> None:
        """Makes the run write into ``.restart/`` until :meth:`commit`, with no records yet."""

        def stage() -> None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir()
            metrics_lib.write(self.staging / METRICS, [])

        self._primary(stage)
        distributed.barrier("workdir staged")
        self.staged = True

    def commit(self) -> None:
        """After the staged run's first checkpoint: its files replace the previous run's."""
        if not self.staged:
            return

        def commit() -> None:
            (self.staging / COMMITTING).touch()
            self._finish_commit()

        self._primary(commit)
        distributed.barrier("workdir committed")
        self.staged = False

    def _prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.staging / COMMITTING).exists():
            self._finish_commit()  # a crash interrupted the commit of a new run
        else:
            shutil.rmtree(self.staging, ignore_errors=True)  # a new run that never saved
        metrics_lib.remove_partial_writes(self.path / METRICS)

    def _finish_commit(self) -> None:
        """The steps of a commit, each of which a crash may interrupt: every one is done once
        whatever the point a previous attempt reached."""
        live, new = self.path / CHECKPOINTS, self.staging / CHECKPOINTS
        if new.exists():
            if live.exists():
                live.rename(self.staging / REPLACED)
            new.rename(live)
        if (self.staging / METRICS).exists():
            os.replace(self.staging / METRICS, self.path / METRICS)
        shutil.rmtree(self.path / DAMAGED, ignore_errors=True)
        (self.path / CURVES).unlink(missing_ok=True)
        shutil.rmtree(self.staging)

    def _primary(self, action: Callable[[], None]) -> None:
        if not distributed.is_primary():
            return
        try:
            action()
        except OSError as err:
            raise TrainingError(f"cannot prepare the work directory {self.path}: {err}") from err
