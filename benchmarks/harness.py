"""The timing harness shared by the benchmark sections.

Every variant gets its own buffers and a ``jax.jit`` step that donates params and state;
variants are called round robin with a rotating start (interleaved, so that machine drift hits
them alike) and reported by their median. Results go to one JSON file, one list of rows per
section, next to the machine they ran on and the command that produced them.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import adam_jax

LR = 1e-3
Row = dict[str, Any]
Step = Callable[[Any, Any, Any], tuple[Any, Any]]


@dataclass(frozen=True)
class Settings:
    """What the command line asks of every section.

    ``repeats`` (timed calls per variant) is None for each section's own default; ``quick``
    asks for small sizes and a few repeats (a smoke test of the harness, not a measurement).
    """

    repeats: int | None = None
    quick: bool = False
    compile_leaves: tuple[int, ...] = (100, 1000, 3000)
    #: The rows a section has finished so far: a long section appends each row as it makes it,
    #: so that a run stopped mid-section (``timeout``, a lent device's time running out) keeps
    #: them; ``benchmarks.run`` empties it before each section.
    finished: list[Row] = field(default_factory=list)

    def repeats_or(self, default: int, quick: int = 3) -> int:
        if self.repeats is not None:
            return self.repeats
        return quick if self.quick else default


def machine_info() -> Row:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "jax_device": f"{device.platform}: {device.device_kind}",
        "jax": jax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        # Which checkout was measured: comparisons of two revisions rely on it.
        "adam_jax_path": str(Path(adam_jax.__file__).resolve().parent),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg(),
    }


def adam_step(tx: optax.GradientTransformation) -> Step:
    """One optimizer step: ``tx.update`` then ``optax.apply_updates``."""

    def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def copy_tree(tree: Any) -> Any:
    """Fresh buffers: every variant donates its own."""
    return jax.tree.map(jnp.copy, tree)


class Runner:
    """One variant: a donating jitted step, its (params, grads, state) buffers, its times and
    the minor page faults of the process during each of its calls (memory the step touched for
    the first time: XLA:CPU allocates its temporaries anew for every call)."""

    def __init__(self, name: str, step: Step, params: Any, grads: Any, state: Any):
        self.name = name
        self.fn = jax.jit(step, donate_argnums=(0, 2))
        self.params, self.grads, self.state = params, grads, state
        self.times: list[float] = []
        self.page_faults: list[int] = []

    def __call__(self) -> tuple[float, int]:
        """One step: its seconds and page faults."""
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        self.params, self.state = self.fn(self.params, self.grads, self.state)
        jax.block_until_ready((self.params, self.state))
        seconds = time.perf_counter() - start
        return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def release(self) -> None:
        """Frees the buffers; the times stay."""
        del self.params, self.grads, self.state


def interleaved(runners: list[Runner], repeats: int, warmup: int = 2) -> None:
    """``repeats`` rounds; in each, every runner once, starting one later than the round before."""
    for runner in runners:
        for _ in range(warmup):
            runner()
    for i in range(repeats):
        k = i % len(runners)
        for runner in runners[k:] + runners[:k]:
            seconds, faults = runner()
            runner.times.append(seconds)
            runner.page_faults.append(faults)


def time_compile(step: Step, args: tuple[Any, ...]) -> tuple[float, float]:
    """Seconds of tracing + lowering (``jit(step).lower``) and of XLA compilation."""
    fn = jax.jit(step, donate_argnums=(0, 2))
    start = time.perf_counter()
    lowered = fn.lower(*args)
    traced = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    return traced, time.perf_counter() - start


class ResultsFile:
    """The JSON file of a run: sections re-run are replaced, the others kept."""

    def __init__(self, path: Path, command: str):
        self.path = path
        self.command = command
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        self.machine = machine_info()
        self.data["machine"] = self.machine

    def record(
        self, section: str, rows: list[Row], seconds: float, stopped_early: bool = False
    ) -> None:
        """Writes ``rows`` as ``section``'s (``stopped_early``: the rows a run stopped before the
        section's end had finished). The file is replaced whole: a run stopped while it writes
        leaves the previous one."""
        self.data[section] = rows
        self.data.setdefault("section_seconds", {})[section] = seconds
        self.data.setdefault("section_runs", {})[section] = {
            "command": self.command,
            "date_utc": self.machine["date_utc"],
            "load_average_at_start": self.machine["load_average_at_start"],
            **({"stopped_early": True} if stopped_early else {}),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(partial, self.path)
