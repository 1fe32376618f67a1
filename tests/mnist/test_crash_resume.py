"""The command line under real faults, as a user or a cluster scheduler inflicts them:
SIGKILL at random moments (in the middle of checkpoint writes among them), SIGTERM, a second
signal. Every interrupted run, resumed, ends bit-identical to the uninterrupted run, and no
traceback reaches the user."""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from mnist_helpers import REPO_ROOT, records_without_timing

from examples.mnist import data

STEPS_PER_EPOCH = 32
STEPS = 2 * STEPS_PER_EPOCH
# A small run of the real program on real data: 2 epochs of 32 steps of the MLP.
ARGS = [
    "--model", "mlp", "--epochs", "2", "--train-limit", "1024", "--batch-size", "32",
    "--log-every", "8", "--no-progress",
]  # fmt: skip
# Checkpoints every 8 steps make writes a large part of the run, so kills land in them.
FREQUENT = ["--checkpoint-every", "8"]


@pytest.fixture(scope="module")
def environment(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The subprocesses' environment: the data, the repository (for kill_in_checkpoint.py),
    and a persistent compilation cache that the uninterrupted run fills (so that killed runs,
    which only read it, start faster)."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(
        os.environ,
        **{
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
            data.ENV_DATA_DIR: str(mnist_dir),
            "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        },
    )


def command(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "examples.mnist", *ARGS, "--workdir", str(workdir), *extra]


def final_checkpoint(workdir: Path) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """The newest checkpoint's step, arrays and JSON record."""
    handlers = {"state": ocp.StandardCheckpointHandler(), "run": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(workdir.absolute() / "checkpoints", item_handlers=handlers) as m:
        step = m.latest_step()
        restored = m.restore(step)
    return step, restored["state"], restored["run"]


def assert_same_as(reference: Path, workdir: Path) -> None:
    """Same final step, arrays (bit for bit) and records; no leftovers of interrupted writes."""
    step, arrays, run = final_checkpoint(workdir)
    expected_step, expected_arrays, expected_run = final_checkpoint(reference)
    assert step == expected_step == STEPS
    assert run["digest"] == expected_run["digest"]
    jax.tree.map(np.testing.assert_array_equal, arrays, expected_arrays)
    assert records_without_timing(workdir / "metrics.jsonl") == records_without_timing(
        reference / "metrics.jsonl"
    )
    assert ocp.utils.tmp_checkpoints(workdir.absolute() / "checkpoints") == []
    assert sorted(p.name for p in workdir.iterdir()) == [
        "checkpoints",
        "curves.png",
        "metrics.jsonl",
    ]


@pytest.fixture(scope="module")
def reference(environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The work directory of the uninterrupted run."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    result = subprocess.run(
        command(workdir, *FREQUENT), cwd=REPO_ROOT, env=environment, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return workdir


def _wait_for(
    condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 120
) -> bool:
    """Polls ``condition`` every 2 ms; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _checkpoint_names(workdir: Path) -> list[str]:
    try:
        return os.listdir(workdir / "checkpoints")
    except FileNotFoundError:
        return []


def _steps(workdir: Path) -> list[int]:
    return sorted(int(name) for name in _checkpoint_names(workdir) if name.isdigit())


def _partial_writes(workdir: Path) -> set[str]:
    return {name for name in _checkpoint_names(workdir) if ".orbax-checkpoint-tmp" in name}


# When each kill lands: at a random time after the start (during start-up, the restore or
# training) or after the first new checkpoint (training, an evaluation or a write), sent from
# here; or from inside the program, in the middle of writing the checkpoint of a random step,
# once its arrays are written ("arrays") or once its JSON record is ("record").
KILLS = ("any time", "arrays", "training", "record")
KILL_IN_CHECKPOINT = Path(__file__).with_name("kill_in_checkpoint.py")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(
    reference: Path, environment: dict[str, str], tmp_path: Path
) -> None:
    rng = random.Random(0)
    workdir = tmp_path / "run"
    log = []
    for kind in KILLS:
        resumed_from = max(_steps(workdir), default=0)
        left_by_earlier_kills = _partial_writes(workdir)
        args = command(workdir, *FREQUENT, "--resume")
        if kind in ("arrays", "record"):
            # One of the next two checkpoints: the kills leave most of the run for the last.
            target = min(resumed_from + 8 * rng.randint(1, 2), STEPS)
            args = [sys.executable, str(KILL_IN_CHECKPOINT), kind, str(target), *args[3:]]
        process = subprocess.Popen(
            args, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        if kind == "any time":
            # Mostly in the start-up (imports, data, restore) or the first steps.
            time.sleep(rng.uniform(0.1, 1.5))
            process.kill()
        elif kind == "training":
            newer = resumed_from
            assert _wait_for(lambda newer=newer: max(_steps(workdir), default=0) > newer, process)
            time.sleep(rng.uniform(0.0, 0.15))
            process.kill()
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == -signal.SIGKILL, f"the run ended before the kill: {stderr}"
        assert "Traceback" not in stderr
        # A write in progress (a lower bound: a new write may reuse an old one's name).
        writing = bool(_partial_writes(workdir) - left_by_earlier_kills)
        if kind in ("arrays", "record"):
            assert f"{target}.orbax-checkpoint-tmp" in _partial_writes(workdir)
            assert target not in _steps(workdir)
            writing = True
        log.append((kind, resumed_from, max(_steps(workdir), default=0), writing))

    result = subprocess.run(
        command(workdir, *FREQUENT, "--resume"), cwd=REPO_ROOT, env=environment,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    print("kills (kind, resumed from, newest checkpoint at the kill, mid-write):", *log, sep="\n")
    assert any(writing for *_, writing in log), "no kill landed in a checkpoint write"
    assert_same_as(reference, workdir)


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_the_printed_command_resumes(
    reference: Path, environment: dict[str, str], tmp_path: Path
) -> None:
    """SIGTERM in epoch 2, just after the checkpoint of step 40: the program finishes the
    step, writes a checkpoint of it, says where it is and how to resume, and exits with 143;
    the command it prints ends the run bit-identical to the uninterrupted one."""
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        command(workdir, *FREQUENT), cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert _wait_for(lambda: 40 in _steps(workdir), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    match = re.fullmatch(
        r"stopped by SIGTERM after step (\d+) \(epoch 2, \d+ of 32 steps done\); "
        r"checkpoint: (\S+)\nResume with: (.+)\n",
        stderr,
    )
    assert match, stderr
    step = int(match[1])
    assert 40 <= step < STEPS
    assert Path(match[2]) == workdir.absolute() / "checkpoints" / str(step)
    assert max(_steps(workdir)) == step

    resume = shlex.split(match[3])
    assert resume[1:3] == ["-m", "examples.mnist"]
    assert resume[-1] == "--resume"
    result = subprocess.run(  # as printed
        resume, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert f"Resuming from step {step} of {STEPS} (epoch 2, " in result.stdout
    assert_same_as(reference, workdir)


def test_second_signal_stops_at_once() -> None:
    """The first SIGTERM only asks the loop to stop; a second one ends the process by the
    signal's default action, without waiting for anything."""
    script = textwrap.dedent(
        """
        import os, signal, time
        from examples.common.interrupts import StopRequests

        with StopRequests() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            while stop.signum is None:
                time.sleep(0.001)
            print("asked to stop by", stop.signum, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
            print("still running")
        """
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == -signal.SIGTERM
    assert result.stdout == f"asked to stop by {int(signal.SIGTERM)}\n"
    assert time.monotonic() - start < 20
