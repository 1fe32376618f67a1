"""Devices and processes: what must happen before JAX touches a device, and how the processes
of one run agree.

``--devices N`` (the MNIST program's; the language model's ``--mesh`` sets it likewise) trains
on ``N`` devices; on CPU the program asks XLA for that many host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count``) unless ``XLA_FLAGS`` already sets the
count. ``--num-processes P --process-id I --coordinator HOST:PORT`` makes the program one of
``P`` processes that train together through ``jax.distributed`` (on CPU with JAX's gloo
collectives), each with ``N / P`` of the devices. Both must be settled before JAX creates its
backend, which importing ``adam_jax`` already does: ``python -m examples.mnist`` calls
:func:`prepare` before it imports anything else.

Every process runs the same loop; decisions that rest on what one process sees alone (a signal,
free disk space, a damaged checkpoint) go through :func:`everywhere` so that all of them take
the same branch, and only the first process (:func:`is_primary`) writes the files that are not
checkpoints.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

import jax
import numpy as np
from jax.experimental import multihost_utils

from examples.common.errors import DeviceError

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that place the run on devices and processes."""
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="train on N devices (over all processes), each taking 1/N of every batch "
        "(None: 1 device, or with several processes every device of every process)",
    )
    add_process_arguments(parser)


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that make the program one of several processes of a run."""
    parser.add_argument(
        "--num-processes",
        type=int,
        default=1,
        metavar="P",
        help="processes that train together through jax.distributed (see examples.common.launch)",
    )
    parser.add_argument(
        "--process-id", type=int, default=0, metavar="I", help="this process: 0 to P - 1"
    )
    parser.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="address of process 0's coordination service (with --num-processes > 1)",
    )


def check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the options of :func:`add_arguments`, if anything."""
    if problem := check_process_arguments(args):
        return problem
    processes = args.num_processes
    if args.devices is not None:
        if args.devices < 1:
            return f"--devices must be an integer >= 1, got {args.devices}"
        if args.devices % processes:
            return (
                f"--devices {args.devices} must be a multiple of --num-processes {processes}: "
                "every process brings the same number of devices"
            )
    return None


def check_process_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the options of :func:`add_process_arguments`, if anything."""
    processes = args.num_processes
    if processes < 1:
        return f"--num-processes must be an integer >= 1, got {processes}"
    if not 0 <= args.process_id < processes:
        return (
            f"--process-id must be in [0, {processes - 1}] with --num-processes {processes}, "
            f"got {args.process_id}"
        )
    if processes > 1 and not args.coordinator:
        return f"--coordinator HOST:PORT is required with --num-processes {processes}"
    return None


def prepare(argv: Sequence[str], prog: str) -> None:
    """Asks for the host devices and joins the other processes, from the command line
    ``argv``; must run before JAX creates its backend. Exits with status 2 on bad options."""
    # The other options (--help among them) are main's, which parses them all again.
    parser = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    add_arguments(parser)
    args, _ = parser.parse_known_args(argv)
    if problem := check_arguments(args):
        parser.error(problem)
    if args.devices is not None and args.devices > args.num_processes:
        request_host_devices(args.devices // args.num_processes)
    join(args)


def join(args: argparse.Namespace) -> None:
    """Joins the other processes of the run (options of :func:`add_process_arguments`), if
    there are any; must run before JAX creates its backend."""
    if args.num_processes > 1:
        # The CPU backend has no cross-process collectives of its own; gloo is JAX's.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        drop_native_lines(GLOO_PIECES)
        initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )


# The line gloo prints on standard output, from its C++ code, for each group of devices it
# connects ("[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks
# is : 1"): several per process. The device threads write theirs at once, a piece at a time, so
# the pieces interleave into lines made of nothing else.
GLOO_PIECES = re.compile(
    rb"(\[Gloo\] Rank |\d+| is connected to | peer ranks\. "
    rb"|Expected number of connected peer ranks is : )*\n?"
)


def drop_native_lines(pattern: re.Pattern[bytes]) -> None:
    """Leaves out of this process's standard output the lines that native code (C++) writes
    there and that ``pattern`` matches whole. Python's output (``sys.stdout``, reopened on a
    copy of the file descriptor) goes on to the same file as before, a terminal where it was
    one, so progress bars behave as before; what native code writes to file descriptor 1
    passes through a pipe that a thread copies to that file, less those lines."""
    sys.stdout.flush()
    target = os.dup(1)
    read, write = os.pipe()
    os.dup2(write, 1)
    os.close(write)
    sys.stdout = open(  # noqa: SIM115 (the process's standard output, open until it ends)
        target, "w", buffering=1, encoding=sys.stdout.encoding, errors=sys.stdout.errors
    )

    def copy() -> None:
        with open(read, "rb") as native:
            for line in native:
                if not pattern.fullmatch(line):
                    os.write(target, line)

    threading.Thread(target=copy, name="native-stdout", daemon=True).start()


# Seconds without a heartbeat after which the coordination service declares a process dead
# and ends the others (JAX's default, 100, left a survivor waiting over a minute).
HEARTBEAT_TIMEOUT_SECONDS = 10


def initialize(**where: Any) -> None:
    """``jax.distributed.initialize(**where)`` (no arguments: as the cluster says), with JAX's
    preemption service off and a heartbeat timeout of :data:`HEARTBEAT_TIMEOUT_SECONDS`. The
    runs stop together on their own (:func:`first_signal`); that service would only keep a
    request pending with the coordinator until the processes shut down, still in flight when
    the first process stops the coordination service."""
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS, **where)


# How a collective fails when another process has gone (gloo's TCP transport on CPU).
LOST_PEER_MESSAGES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another process has gone."""
    return (
        jax.process_count() > 1
        and isinstance(error, (RuntimeError, ValueError))
        and any(message in str(error) for message in LOST_PEER_MESSAGES)
    )


def end_for_lost_peer(prog: str, error: BaseException, next_step: str) -> NoReturn:
    """Ends this process at once with one line: a collective failed because another process
    has gone, and ``next_step`` (``Resume with: COMMAND``). JAX's own shutdown would wait for
    the dead process until the heartbeat timeout and then abort with a C++ stack trace; nothing
    is left to save (the checkpoints on disk are whole or absent), so the process exits
    without it."""
    reason = " ".join(str(error).split())[:200]
    print(
        f"{prog}: process {jax.process_index()}: another process stopped answering (a "
        f"collective failed: {reason}). {next_step}",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(1)


def request_host_devices(count: int) -> None:
    """Asks XLA for ``count`` CPU devices in this process, unless ``XLA_FLAGS`` already sets a
    count (which wins). Has no effect once JAX has created its backend, nor on GPUs or TPUs."""
    flags = os.environ.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()


def host_device_count_note(platform: str) -> str:
    """The end of an error about the number of devices where ``XLA_FLAGS`` fixes it (CPU
    devices, ``--xla_force_host_platform_device_count``): that it does; else nothing."""
    flags = os.environ.get("XLA_FLAGS", "")
    if platform != "cpu" or DEVICE_COUNT_FLAG not in flags:
        return ""
    return (
        f" (XLA_FLAGS={flags!r} fixes the CPU device count of each process; drop "
        f"{DEVICE_COUNT_FLAG} from it and the program sets it)"
    )


def mesh_devices(devices: int | None) -> list[jax.Device]:
    """The devices of a ``devices``-device data mesh: the first ``devices / P`` local devices of
    each of the ``P`` processes, in process order. Raises :class:`DeviceError` naming what is
    available if there are too few."""
    processes = jax.process_count()
    if devices is None:
        return jax.devices() if processes > 1 else jax.devices()[:1]
    if devices < 1 or devices % processes:
        raise DeviceError(
            f"devices must be a positive multiple of the {processes} processes, got {devices}"
        )
    per_process = devices // processes
    local = jax.local_device_count()
    if per_process > local:
        platform = jax.devices()[0].platform
        where = "" if processes == 1 else f" in each of the {processes} processes"
        raise DeviceError(
            f"--devices {devices} needs {per_process} devices{where}, but there are {local} "
            f"({platform}): choose --devices from 1 to {local * processes}"
            f"{host_device_count_note(platform)}"
        )
    by_process: dict[int, list[jax.Device]] = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    return [device for index in sorted(by_process) for device in by_process[index][:per_process]]


def is_primary() -> bool:
    """Whether this is the process that writes the files other than checkpoints."""
    return jax.process_index() == 0


def everywhere(flag: bool) -> bool:
    """Whether ``flag`` holds in every process (each passes its own); with several processes
    a collective, which every process must call at the same point."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def first_signal(signum: int | None) -> int | None:
    """The signal that one of the processes received, if any (each passes its own); a
    collective with several processes."""
    if jax.process_count() == 1:
        return signum
    received = multihost_utils.process_allgather(np.asarray(signum or 0, np.int32))
    return next((int(s) for s in np.ravel(received) if s), None)


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier ``name``."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def host_copy(tree: Any) -> Any:
    """The NumPy value of every array of ``tree``. An array split over several processes (the
    optimizer state with ``--shard-optimizer``) is gathered from them: a collective."""

    def fetch(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not (
            leaf.is_fully_addressable or leaf.is_fully_replicated
        ):
            return multihost_utils.process_allgather(leaf, tiled=True)
        return jax.device_get(leaf)

    return jax.tree.map(fetch, tree)
