"""Starts the processes of one run of a program on this machine: ``python -m
examples.mnist.launch --num-processes 2 --devices 8 --epochs 1`` runs ``python -m
examples.mnist --num-processes 2 --process-id I --coordinator 127.0.0.1:PORT --devices 8
--epochs 1`` for I = 0 and 1, with PORT a free port (``examples.lm.launch`` likewise): every
option but ``--num-processes`` goes to each process unchanged. The first process prints the
progress and the results; each prints its own errors.

SIGINT (Ctrl-C) and SIGTERM are passed on to every process, once per signal received: the
processes stop together after the same step with a checkpoint, as one process does, and a
second signal ends them at once. If a process fails, the others (which may wait for it in a
collective for ever) are killed after ``--grace-seconds``, and the launcher says which process
failed, how (its exit status, or the signal that killed it) and the command that resumes the
run. A process that JAX's distributed runtime ends because another has gone (it aborts with C++
log lines and a stack trace) is named in one line instead of that report, as is one that the
launcher killed. The exit status is
that of the first process to fail, or 0.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import IO

from examples.common.errors import ArgumentParser, DefaultsHelpFormatter

# Seconds the launcher waits, once a process has failed, before it says which one did.
SETTLE_SECONDS = 0.5
# The options the launcher sets for each process.
PROCESS_OPTIONS = ("--num-processes", "--process-id", "--coordinator")


def interpreter() -> str:
    """This Python as a printed command names it, to run as printed from the working
    directory: ``python`` where that is the one on PATH (an activated environment), else its
    path, relative where it lies under the working directory (``.venv/bin/python``)."""
    path = os.path.abspath(sys.executable)
    found = shutil.which("python")
    if found is not None and os.path.abspath(found) == path:
        return "python"
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


def resume_command(program: str, argv: Sequence[str], num_processes: int = 1) -> str:
    """The command line that continues the run of ``python -m program argv`` (with this
    :func:`interpreter`): the same, less ``--restart``, with ``--resume`` (the default, said
    aloud); with several processes, the launcher's, which starts them all."""
    kept = [arg for arg in argv if arg != "--restart"]
    resume = [] if "--resume" in kept else ["--resume"]
    if num_processes == 1:
        return shlex.join([interpreter(), "-m", program, *kept, *resume])
    kept = _without_options(kept, PROCESS_OPTIONS)
    launcher = [interpreter(), "-m", f"{program}.launch", "--num-processes", str(num_processes)]
    return shlex.join([*launcher, *kept, *resume])


def _without_options(argv: Sequence[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` less the ``options`` (each with its value)."""
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg in options:
            skip_value = True
        elif not arg.startswith(tuple(option + "=" for option in options)):
            kept.append(arg)
    return kept


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (the coordinator binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def commands(
    num_processes: int, program_args: Sequence[str], port: int, program: str
) -> list[list[str]]:
    """The command line of each process of ``python -m program``."""
    run = [sys.executable, "-m", program, "--num-processes", str(num_processes)]
    run += ["--coordinator", f"127.0.0.1:{port}"]
    return [[*run, "--process-id", str(i), *program_args] for i in range(num_processes)]


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it (128 + N for a process ended by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
    """How a child ended, in words: ``exit status 1``, ``killed by SIGKILL (exit status 137)``."""
    if returncode < 0:
        return (
            f"killed by {signal.Signals(-returncode).name} (exit status {exit_status(returncode)})"
        )
    return f"exit status {returncode}"


# The exit status of a program that refused its command line: the run never started.
USAGE_ERROR = 2


def stopped_by_request(returncode: int) -> bool:
    """Whether a child ended as a program does that a signal asked to stop (it saves a
    checkpoint and exits with 128 + the signal's number): not a failure to report."""
    return returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM)


# An error that JAX's distributed runtime logs (absl's format: severity, date, time, thread,
# file:line) when a process has gone: the start of the report with which it ends the others.
RUNTIME_ERROR_LOG = re.compile(
    rb"[EF]\d{4} [\d:.]+ +\d+ (coordination_service\w*\.cc|client\.h):\d+\] "
)


class ErrorRelay:
    """Copies a process's standard error to the launcher's as it comes, but for what follows
    an error logged by JAX's distributed runtime (:data:`RUNTIME_ERROR_LOG`), which it holds:
    where the process then fails, that is the runtime's abort (C++ log lines, a stack trace),
    which :meth:`finish` replaces with one line."""

    def __init__(self, stream: IO[bytes]):
        self.held: list[bytes] = []
        self.thread = threading.Thread(target=self._copy, args=(stream,), daemon=True)
        self.thread.start()

    def _copy(self, stream: IO[bytes]) -> None:
        with stream:
            for line in stream:
                if self.held or RUNTIME_ERROR_LOG.match(line):
                    self.held.append(line)
                else:
                    sys.stderr.write(line.decode(errors="replace"))
                    sys.stderr.flush()

    def ended_by_runtime(self, returncode: int) -> bool:
        """Whether the process, which ended with ``returncode``, failed after the runtime
        logged an error (waits for the rest of its output)."""
        self.thread.join(timeout=5)
        return returncode != 0 and bool(self.held)

    def finish(self, replacement: str | None) -> None:
        """Prints what was held, or ``replacement`` in its place."""
        self.thread.join(timeout=5)
        if replacement is not None:
            print(replacement, file=sys.stderr, flush=True)
        else:
            sys.stderr.write(b"".join(self.held).decode(errors="replace"))
            sys.stderr.flush()


def run(
    commands: list[list[str]],
    grace_seconds: float,
    resume: str | None = None,
    prog: str = "launch",
) -> int:
    """Runs the processes to their end; returns the launcher's exit status. When a process
    fails (and no signal asked the run to stop), says which one, how it ended, and the
    command ``resume`` that continues the run."""
    # Each in a process group of its own: the terminal's Ctrl-C reaches only the launcher,
    # which passes it on once (a second signal would stop the processes at once).
    processes = [
        subprocess.Popen(command, process_group=0, stderr=subprocess.PIPE) for command in commands
    ]
    relays = [ErrorRelay(process.stderr) for process in processes if process.stderr is not None]
    signalled: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        del frame
        signalled.append(signum)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {
        signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        failed: int | None = None  # The status of the first process that failed,
        index: int | None = None  # and its index.
        reported = False  # whether that process failed (not stopped when asked)
        deadline = float("inf")
        killed: set[int] = set()  # the processes killed once the grace period ran out
        while True:
            running = [process for process in processes if process.poll() is None]
            failures = [
                (i, p.returncode) for i, p in enumerate(processes) if p.returncode not in (None, 0)
            ]
            if failed is None and failures:
                # The processes that a death leaves behind fail in turn, some of them before
                # the dead one is reaped: a moment's wait, then the one a signal killed, if any.
                time.sleep(SETTLE_SECONDS)
                for process in processes:
                    process.poll()
                failures = [
                    (i, p.returncode)
                    for i, p in enumerate(processes)
                    if p.returncode not in (None, 0)
                ]
                # The first to fail: not one that the runtime ended for another's death, and
                # one that a signal killed where there is one.
                index, returncode = min(
                    failures,
                    key=lambda failure: (
                        relays[failure[0]].ended_by_runtime(failure[1]),
                        failure[1] >= 0,
                    ),
                )
                failed = exit_status(returncode)
                deadline = time.monotonic() + grace_seconds
                if not (signalled or stopped_by_request(returncode)):
                    reported = True
                    others = any(process.returncode is None for process in processes)
                    stopping = f"; the others are stopped within {grace_seconds:g} s"
                    print(
                        f"{prog}: process {index} of {len(processes)} ended "
                        f"({describe(returncode)}){stopping if others else ''}",
                        file=sys.stderr,
                        flush=True,
                    )
            if not running:
                break
            if time.monotonic() > deadline:
                for process in running:
                    process.kill()
                    killed.add(processes.index(process))
            time.sleep(0.05)
        for i, (process, relay) in enumerate(zip(processes, relays, strict=True)):
            named = f"{prog}: process {i} of {len(processes)}"
            if i in killed:  # what it held is the runtime's report, cut short
                relay.finish(
                    f"{named} killed, still running {grace_seconds:g} s after process {index} ended"
                )
            elif index not in (None, i) and relay.ended_by_runtime(process.returncode):
                relay.finish(
                    f"{named} stopped: JAX's distributed runtime reported process {index} gone "
                    "(its C++ log left out)"
                )
            else:  # the report of a runtime that failed on its own is kept
                relay.finish(None)
        if reported and resume is not None and failed != USAGE_ERROR:
            print(f"{prog}: resume with: {resume}", file=sys.stderr, flush=True)
        return failed or 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(
    argv: Sequence[str] | None = None,
    *,
    program: str,
    check: Callable[[list[str]], bool] = lambda argv: True,
) -> None:
    """The launcher of ``python -m program``. ``check`` takes the command line of a process
    (the options of all of them, with ``--num-processes`` and ``--coordinator``) and exits,
    as the program would, on a bad option, so that it is said once and before anything
    starts; it returns whether the run keeps checkpoints that a resume command continues."""
    parser = ArgumentParser(
        prog=f"python -m {program}.launch",
        description=f"Start the processes of one run of python -m {program} on this "
        "machine; every other option goes to each of them.",
        formatter_class=DefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        required=True,
        metavar="P",
        help="processes to start, each with --process-id 0 to P - 1 and an equal share of the "
        "devices",
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=10.0,
        help="when a process fails, how long the others may take to end before they are killed",
    )
    args, program_args = parser.parse_known_args(argv)
    if args.num_processes < 1:
        parser.error(f"--num-processes must be an integer >= 1, got {args.num_processes}")
    if args.grace_seconds < 0:
        parser.error(f"--grace-seconds must be >= 0, got {args.grace_seconds}")
    given = [arg for arg in program_args if arg.split("=", 1)[0] in PROCESS_OPTIONS]
    if given:
        parser.error(f"{', '.join(given)}: the launcher sets these for each process")
    port = free_port()
    processes = commands(args.num_processes, program_args, port, program)
    resumable = check(processes[0][3:])  # less python -m PROGRAM
    resume = resume_command(program, program_args, args.num_processes) if resumable else None
    raise SystemExit(run(processes, args.grace_seconds, resume, parser.prog))
