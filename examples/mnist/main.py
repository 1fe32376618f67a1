"""Command line of the MNIST example: ``python -m examples.mnist --help``.

Every failure the program anticipates (bad data, no intact checkpoint, settings that differ
from the checkpoint's, missing devices, non-finite values, a stop by SIGTERM or SIGINT) ends
with one message on stderr and a non-zero exit status, not a traceback.

``--devices``, ``--num-processes``, ``--process-id`` and ``--coordinator`` take effect before
JAX starts (:func:`examples.common.distributed.prepare`, which ``python -m examples.mnist``
calls first); :func:`main` called in a running program checks that they match it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from pathlib import Path
from typing import Any

import jax
from rich.console import Console

from examples.common import distributed, launch
from examples.common.errors import (
    ArgumentParser,
    DefaultsHelpFormatter,
    DeviceError,
    Interrupted,
    TrainingError,
)
from examples.common.workdir import workdir_problem
from examples.mnist import compare, data, optimizers
from examples.mnist.config import Config
from examples.mnist.console import summary
from examples.mnist.loop import train_and_evaluate
from examples.mnist.trainer import packing_problem


def parse_args(argv: list[str] | None = None) -> tuple[Config, list[str] | None]:
    """The run's :class:`Config` and, with ``--compare``, the optimizers to compare."""
    config, compared, _ = _parse(argv)
    return config, compared


def parser() -> ArgumentParser:
    """The program's command line (``--help`` gives each default once)."""
    options = ArgumentParser(
        prog="python -m examples.mnist",
        description="Train a Flax NNX model on MNIST with adam_jax.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_options(options)
    return options


def _parse(argv: list[str] | None) -> tuple[Config, list[str] | None, argparse.Namespace]:
    command_line = parser()
    args = command_line.parse_args(argv)
    if problem := distributed.check_arguments(args):
        command_line.error(problem)
    if args.seeds < 1:
        command_line.error(f"--seeds must be an integer >= 1, got {args.seeds}")
    if args.compare is not None:
        unknown = sorted(set(args.compare) - set(optimizers.NAMES))
        if unknown or not args.compare:
            command_line.error(
                f"--compare: unknown optimizers {unknown}; choose from {optimizers.NAMES}"
            )
    try:
        config = config_from(args)
        for name in args.compare or ():
            # Every compared optimizer must take the run's settings (--moments, ...).
            dataclasses.replace(config, optimizer=name)
    except ValueError as err:
        command_line.error(str(err))
    for name in [config.optimizer, *(args.compare or ())] if config.flat_params == "on" else []:
        if problem := packing_problem(dataclasses.replace(config, optimizer=name)):
            command_line.error(f"--flat-params on: {problem}; use --flat-params off (or auto)")
    return config, args.compare, args


# The settings' types (the fields' own are strings: `from __future__ import annotations`).
_TYPES = typing.get_type_hints(Config)


def add_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`Config` setting (see :func:`examples.mnist.config.option`), in
    the order of its fields, and among them the options that are not settings."""
    for field in dataclasses.fields(Config):
        if field.name == "devices":
            # --help lists here --compare and --seeds, then --devices with the options of the
            # processes, which distributed.prepare reads before JAX starts.
            _add_compare_options(parser)
            distributed.add_arguments(parser)
        elif field.metadata:
            parser.add_argument(_flag(field), **_keywords(field))


def config_from(args: argparse.Namespace) -> Config:
    """The :class:`Config` of the options parsed by :func:`add_options` (a setting without
    one keeps its default). Raises :class:`ValueError` for bad values."""
    values = {}
    for field in dataclasses.fields(Config):
        dest = _flag(field).removeprefix("--").replace("-", "_")
        if dest in vars(args):
            value = getattr(args, dest)
            if _TYPES[field.name] is bool:
                # A switch turns the setting to the value that is not its default.
                value = not field.default if value else field.default
            values[field.name] = value
    return Config(**values)


def _flag(field: dataclasses.Field[Any]) -> str:
    """The option of a setting: ``--name``, or ``--no-name`` for a switch that turns off a
    setting that is on by default."""
    name = field.name.replace("_", "-")
    return f"--no-{name}" if field.default is True else f"--{name}"


def _keywords(field: dataclasses.Field[Any]) -> dict[str, Any]:
    """argparse's keywords for the option of a setting."""
    hint = _TYPES[field.name]
    if hint is bool:
        return {"action": "store_true", **field.metadata}
    # An `int | None` setting takes an int; None is only ever its default.
    (value_type,) = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
    return {"type": value_type, "default": field.default, **field.metadata}


def _add_compare_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compare",
        type=lambda names: [name.strip() for name in names.split(",") if name.strip()],
        default=None,
        metavar="OPT1,OPT2,...",
        help="train once per optimizer and write comparison.md and comparison.png",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="with --compare: train each optimizer with N seeds (--seed and the N-1 after it)",
    )


def resume_command(argv: list[str], num_processes: int = 1) -> str:
    """The command line that continues the run of ``argv``: with several processes, the
    launcher's, which starts them all."""
    return launch.resume_command("examples.mnist", argv, num_processes)


def quiet_leftovers_of_failed_writes() -> None:
    """Keeps orbax's debris of a failed checkpoint write off the terminal, for the rest of the
    process (``python -m examples.mnist`` calls it; the debris can arrive at any time).

    This program reports a failed write itself, in one line. Orbax writes the arrays in
    parallel; when one write fails it gives up on the others, which fail in turn in the
    background: orbax logs each (absl logger, with a traceback), asyncio logs the tasks whose
    errors nobody read, and callbacks into the closed event loop raise "Event loop is closed"
    as unraisable exceptions. Other unraisable exceptions still reach the previous hook.
    """
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    previous_hook = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous_hook(unraisable)

    sys.unraisablehook = hook


def check_launch(argv: list[str]) -> bool:
    """What ``python -m examples.mnist.launch`` checks before it starts the processes of
    ``argv`` (:func:`examples.common.launch.main`): exits with status 2 on a bad option or
    work directory; the run keeps checkpoints (in ``--workdir``)."""
    _parse_with_workdir(argv)
    return True


def _parse_with_workdir(argv: list[str]) -> tuple[Config, list[str] | None, argparse.Namespace]:
    """:func:`_parse`, and the work directory checked (exits with status 2 where it cannot be
    made)."""
    parsed = _parse(argv)
    if problem := workdir_problem(Path(parsed[0].workdir)):
        parser().error(problem)
    return parsed


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    config, compared, args = _parse_with_workdir(argv)
    console = Console(quiet=not distributed.is_primary())
    # With several processes each reports its own failures, naming itself.
    who = f"process {args.process_id}: " if args.num_processes > 1 else ""
    try:
        if jax.process_count() != args.num_processes:
            raise DeviceError(
                f"--num-processes {args.num_processes}, but this program is one of "
                f"{jax.process_count()} processes: start each with python -m examples.mnist "
                "(or all with python -m examples.mnist.launch)"
            )
        dataset = data.load(config.dataset, config.data_dir)
        if compared:
            compare.compare(config, compared, dataset, console, seeds=args.seeds)
            return
        _, history = train_and_evaluate(config, dataset, console)
    except Interrupted as err:
        if distributed.is_primary():  # All processes stop at the same step.
            print(
                f"{err}\nResume with: {resume_command(argv, args.num_processes)}",
                file=sys.stderr,
            )
        raise SystemExit(err.exit_status) from err
    except TrainingError as err:
        print(f"{who}error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_status) from err
    except data.DataError as err:
        raise SystemExit(f"{who}error: {err}") from err
    except (RuntimeError, ValueError) as err:
        if not distributed.lost_peer(err):
            raise
        resume = resume_command(argv, args.num_processes)
        distributed.end_for_lost_peer("python -m examples.mnist", err, f"Resume with: {resume}")
    console.print(summary(config, history))
