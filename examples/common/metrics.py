"""``metrics.jsonl``: the run's records, one JSON object per line.

Every record has ``kind`` and ``step`` (optimizer steps done). ``kind: "step"`` records hold the
training loss and accuracy of the last ``log_every`` steps; ``kind: "epoch"`` records hold an
epoch's training and test figures. The file is always rewritten whole, into a temporary file
that is renamed over the old one, so it is never half written; reading skips (with a warning)
lines that are not complete records, such as the torn last line of a file from elsewhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Metrics = dict[str, Any]


def read(path: Path, warn: Callable[[str], None] | None = None) -> list[Metrics]:
    """The records of ``path`` (none if it does not exist), in order.

    Lines that are not a JSON object with an integer ``step`` are left out, and ``warn``
    receives one message naming them.
    """
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records, skipped = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            skipped.append(number)
    if skipped and warn is not None:
        torn = " (the last one is cut short)" if skipped[-1] == len(lines) else ""
        warn(f"{path}: ignored line(s) {_ranges(skipped)} that are not complete records{torn}")
    return records


def default_file_mode() -> int:
    """The mode ``open`` gives a new file (0o666 less the umask): ``tempfile.mkstemp``'s
    private 0o600 would otherwise survive the rename of a temporary file into place."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write(path: Path, records: Iterable[Metrics]) -> None:
    """Replaces ``path`` with ``records`` atomically: a crash leaves the old or the new file.

    Raises ``OSError`` (a full disk, say) with the old file untouched.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_partial_writes(path: Path) -> None:
    """Deletes the temporary files of :func:`write` calls that a crash interrupted."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
