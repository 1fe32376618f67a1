"""A run's folder: ``metrics.jsonl``, ``checkpoints/`` and ``curves.png``, which a fresh run
replaces and a resumed run continues."""

from __future__ import annotations

import shutil
from pathlib import Path

from examples.common import distributed
from examples.common import metrics as metrics_lib
from examples.common.errors import TrainingError

METRICS = "metrics.jsonl"


def prepare(workdir: Path, resume: bool) -> None:
    """Creates ``workdir``; without ``resume``, clears a previous run's files from it rather
    than mixing their records. The first process does it, the others wait for it."""
    if distributed.is_primary():
        try:
            if not resume:
                for name in ("checkpoints", "damaged_checkpoints"):
                    shutil.rmtree(workdir / name, ignore_errors=True)
                for name in (METRICS, "curves.png"):
                    (workdir / name).unlink(missing_ok=True)
            workdir.mkdir(parents=True, exist_ok=True)
            metrics_lib.remove_partial_writes(workdir / METRICS)
        except OSError as err:
            raise TrainingError(f"cannot prepare the work directory {workdir}: {err}") from err
    distributed.barrier("workdir prepared")
