"""Bytes to train on: any text file or folder, or Python's own standard library.

The model reads bytes, so no tokenizer is needed. The last tenth of the corpus is held out;
training windows are drawn uniformly from the rest by a seeded generator, and the held-out
loss is measured on windows evenly spaced over the last tenth, the same at every evaluation.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

HELD_OUT_FRACTION = 0.1


class DataError(ValueError):
    """The corpus cannot be read or is too short; the message names ``--data``."""


def standard_library() -> Path:
    """The folder of Python's standard-library source, present wherever Python runs."""
    return Path(sysconfig.get_paths()["stdlib"])


def text_files(path: Path) -> list[Path]:
    """The files a ``--data`` path stands for: itself, or a folder's files (the standard
    library's top-level modules by default), in a fixed order, hidden ones left out."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"--data {path}: no such file or folder; give a text file or a folder")
    pattern = "*.py" if path == standard_library() else "**/*"
    files = sorted(
        file
        for file in path.glob(pattern)
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"--data {path}: the folder has no files to read")
    return files


def load(path: Path | None = None) -> np.ndarray:
    """The bytes of ``path`` (default: :func:`standard_library`), concatenated, as uint8."""
    files = text_files(standard_library() if path is None else Path(path))
    return np.frombuffer(b"\n".join(file.read_bytes() for file in files), np.uint8)


class Corpus:
    """A corpus split into training bytes and the held-out last tenth."""

    def __init__(self, data: np.ndarray, seq_len: int, source: str = "--data"):
        split = int(len(data) * (1 - HELD_OUT_FRACTION))
        if len(data) - split < seq_len + 1:
            raise DataError(
                f"{source}: {len(data)} bytes is too short for --seq-len {seq_len}: its held-out "
                f"tenth must hold one window of {seq_len + 1} bytes (at least "
                f"{10 * (seq_len + 1)} bytes)"
            )
        self.train, self.held_out = data[:split], data[split:]
        self.window = seq_len + 1

    def batches(self, seed: int, steps: int, batch_size: int) -> np.ndarray:
        """The start of every window of ``steps`` batches, ``(steps, batch_size)``."""
        rng = np.random.default_rng(seed)
        return rng.integers(0, len(self.train) - self.window + 1, (steps, batch_size))

    def windows(self, starts: np.ndarray, held_out: bool = False) -> np.ndarray:
        """The int32 windows, ``starts.shape + (seq_len + 1,)``, starting at ``starts``."""
        data = self.held_out if held_out else self.train
        return data[starts[..., None] + np.arange(self.window)].astype(np.int32)

    def held_out_starts(self, count: int) -> np.ndarray:
        """``count`` window starts evenly spaced over the held-out bytes."""
        return np.linspace(0, len(self.held_out) - self.window, count).astype(np.int64)
