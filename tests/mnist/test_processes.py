"""The program as several processes (``jax.distributed``, CPU collectives through gloo):
2 processes x 4 host devices train as 1 process x 8 devices do, stop together when one of
them gets SIGTERM, write and restore their checkpoints together, and resume through the
launcher; and the launcher itself, with stand-in processes."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from mnist_helpers import REPO_ROOT, state_arrays

from examples.common import launch
from examples.mnist import data, train
from examples.mnist.config import Config

# 2 epochs of 8 steps of the MLP with ZeRO-1; a checkpoint at the end of each epoch, a chance
# to stop every 2 steps. Momentum is linear in the gradients, so that rounding differences of
# sums done in another order stay rounding differences (Adam divides each gradient by its own
# magnitude, which magnifies them where a gradient is close to 0; test_parallel.py has Adam).
ARGS = [
    "--model", "mlp", "--optimizer", "momentum", "--epochs", "2", "--train-limit", "512",
    "--batch-size", "64", "--devices", "8", "--shard-optimizer", "--log-every", "2",
    "--no-progress",
]  # fmt: skip
STEPS = 16
# Bounds each subprocess; the whole test takes about 30 s on 2 cores.
TIMEOUT = 240


@pytest.fixture(scope="module")
def environment(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The processes' environment, without the 8 devices of the test process's XLA_FLAGS
    (the program asks for the 4 that each process needs itself), and with a persistent
    compilation cache that the first processes fill for the others."""
    cache = tmp_path_factory.mktemp("jax_cache")
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    env.pop("XLA_FLAGS", None)
    return env


@contextlib.contextmanager
def started(commands: list[list[str]], env: dict[str, str]) -> Iterator[list[subprocess.Popen]]:
    """The processes of ``commands``; whatever happens, none outlives the block. Two SIGTERMs
    end a training process at once and make the launcher end its own; SIGKILL if not."""
    processes = [
        subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for command in commands
    ]
    try:
        yield processes
    finally:
        running = [p for p in processes if p.poll() is None]
        for _ in range(2):
            for process in running:
                process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
        for process in running:
            try:
                process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    return process.returncode, stdout, stderr


def checkpoint_steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    names = os.listdir(directory) if directory.exists() else []
    return sorted(int(name) for name in names if name.isdigit())


def by_path(tree: Any) -> dict[str, Any]:
    """The leaves of ``tree`` by their paths, with every key as a string (orbax's are)."""
    return {
        "/".join(str(getattr(key, "key", key)) for key in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def checkpoint_state(workdir: Path, step: int) -> dict[str, Any]:
    """The model and optimizer arrays of checkpoint ``step`` by path, as NumPy arrays
    (whatever the devices they were written from)."""
    handlers = {"state": ocp.StandardCheckpointHandler(), "run": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(workdir.absolute() / "checkpoints", item_handlers=handlers) as m:
        stored = m.item_metadata(step)["state"].tree
        target = jax.tree.map(lambda meta: np.zeros(meta.shape, meta.dtype), stored)
        restored = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return by_path(restored["state"]["train_state"])


def assert_within_rounding(actual: Any, expected: Any, ulps: int) -> None:
    """Each array within ``ulps`` float32 units in the last place of its largest magnitude."""

    def check(a: np.ndarray, e: np.ndarray) -> None:
        bound = ulps * np.spacing(np.max(np.abs(e)).astype(np.float32))
        np.testing.assert_allclose(a, e, rtol=0, atol=bound)

    jax.tree.map(check, actual, expected)


@pytest.mark.slow
def test_two_processes_of_4_devices_train_as_one_of_8_and_stop_and_resume_together(
    mnist_dir: Path, environment: dict[str, str], tmp_path: Path
) -> None:
    workdir = tmp_path / "run"
    environment = dict(environment, **{data.ENV_DATA_DIR: str(mnist_dir)})
    common = ["--num-processes", "2", "--coordinator", f"127.0.0.1:{launch.free_port()}"]
    commands = [
        [sys.executable, "-m", "examples.mnist", *common, "--process-id", str(i), *ARGS]
        + ["--workdir", str(workdir)]
        for i in range(2)
    ]
    with started(commands, environment) as processes:
        deadline = time.monotonic() + TIMEOUT
        while not checkpoint_steps(workdir):  # The end of epoch 1.
            ended = [p for p in processes if p.poll() is not None]
            if ended or time.monotonic() > deadline:
                pytest.fail(
                    "no checkpoint: "
                    + "; ".join(f"exit {p.returncode}: {p.communicate()[1]}" for p in ended)
                )
            time.sleep(0.01)
        # Only process 0 is told to stop; process 1 learns it from process 0.
        processes[0].send_signal(signal.SIGTERM)
        (status0, stdout0, stderr0), (status1, stdout1, stderr1) = map(finish, processes)
    assert (status0, status1) == (128 + signal.SIGTERM,) * 2, stderr0 + stderr1
    assert "Traceback" not in stderr0 + stderr1
    # gloo's connection lines (printed from C++) are left out of the output.
    assert "[Gloo]" not in stdout0 + stdout1
    match = re.fullmatch(
        r"stopped by SIGTERM after step (\d+) \(.+\); checkpoint: (\S+)\nResume with: (.+)\n",
        stderr0,
    )
    assert match, stderr0
    step = int(match[1])
    assert step % 2 == 0 and 8 <= step < STEPS  # Processes compare notes every 2 steps.
    assert Path(match[2]) == workdir.absolute() / "checkpoints" / str(step)
    assert max(checkpoint_steps(workdir)) == step

    # The printed command starts both processes again through the launcher.
    resume = shlex.split(match[3])
    assert resume[1:5] == ["-m", "examples.mnist.launch", "--num-processes", "2"]
    assert "--process-id" not in resume and resume[-1] == "--resume"
    with started([resume], environment) as (launcher,):  # as printed
        status, stdout, stderr = finish(launcher)
    assert status == 0, stderr
    assert f"Resuming from step {step} of " in stdout and "[Gloo]" not in stdout
    assert stdout.count("Final test accuracy") == 1  # Only process 0 reports.

    # One process of 8 devices, replicated optimizer state, the same run uninterrupted.
    dataset = data.load("mnist", mnist_dir)
    config = Config(
        model="mlp", optimizer="momentum", epochs=2, train_limit=512, batch_size=64,
        devices=8, checkpoints=False, workdir=str(tmp_path / "one_process"), progress=False,
    )  # fmt: skip
    trainer, _ = train.train_and_evaluate(config, dataset)
    # The sums over the 8 devices come in another order through gloo.
    expected = by_path(state_arrays(trainer.state))
    assert_within_rounding(checkpoint_state(workdir, STEPS), expected, 8)


def _stand_in(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_launcher_passes_signals_on_and_ends_the_others_when_one_fails(capfd) -> None:
    waits_for_sigterm = _stand_in(
        """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
        sys.stdout.write("ready\\n")  # one write: the two processes share the pipe
        sys.stdout.flush()
        time.sleep(60)
        """
    )
    fails = _stand_in("import time, sys; time.sleep(0.5); sys.exit(3)")
    hangs = _stand_in("import time; time.sleep(60)")

    for fail, hang in [(0, 1), (1, 0)]:
        commands = [fails, hangs] if fail == 0 else [hangs, fails]
        start = time.monotonic()
        assert launch.run(commands, grace_seconds=0.5) == 3
        assert time.monotonic() - start < 20
        assert capfd.readouterr().err.splitlines() == [
            f"launch: process {fail} of 2 ended (exit status 3); the others are stopped within "
            "0.5 s",
            f"launch: process {hang} of 2 killed, still running 0.5 s after process {fail} ended",
        ]

    # A SIGTERM to the launcher reaches each process once.
    run = f"launch.run({[waits_for_sigterm] * 2!r}, 5)"
    script = f"from examples.common import launch\nraise SystemExit({run})"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with started([[sys.executable, "-c", script]], env) as (launcher,):
        assert launcher.stdout is not None
        ready = ""
        while ready.count("ready") < 2:
            line = launcher.stdout.readline()
            assert line, f"the launcher's processes ended before both were ready: {ready!r}"
            ready += line
        launcher.send_signal(signal.SIGTERM)
        status, _, stderr = finish(launcher)
    assert status == 7, stderr


def test_launcher_refuses_what_it_sets_itself(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in [
        (["--num-processes", "0"], "--num-processes must be an integer >= 1, got 0"),
        (
            ["--num-processes", "2", "--process-id", "1", "--coordinator=127.0.0.1:1"],
            "--process-id, --coordinator=127.0.0.1:1: the launcher sets these for each process",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            launch.main(argv, program="examples.mnist")
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    commands = launch.commands(2, ["--devices", "8"], 1234, "examples.mnist")
    assert [command[3:] for command in commands] == [
        ["--num-processes", "2", "--coordinator", "127.0.0.1:1234", "--process-id", str(i)]
        + ["--devices", "8"]
        for i in range(2)
    ]
    assert launch.exit_status(-signal.SIGTERM) == 143 and launch.exit_status(1) == 1
