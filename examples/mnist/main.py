"""Command line of the MNIST example: ``python -m examples.mnist --help``.

Every failure the program anticipates (bad data, no intact checkpoint, settings that differ
from the checkpoint's, missing devices, non-finite values, a stop by SIGTERM or SIGINT) ends
with one message on stderr and a non-zero exit status, not a traceback.

``--devices``, ``--num-processes``, ``--process-id`` and ``--coordinator`` take effect before
JAX starts (:func:`examples.mnist.distributed.prepare`, which ``python -m examples.mnist``
calls first); :func:`main` called in a running program checks that they match it.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Any

import jax
from rich.console import Console

from examples.mnist import compare, data, distributed, models, optimizers, train
from examples.mnist.config import LOW_PRECISION, PARAM_DTYPES, Config
from examples.mnist.errors import ArgumentParser, DeviceError, Interrupted, TrainingError
from examples.mnist.launch import PROCESS_OPTIONS


def parse_args(argv: list[str] | None = None) -> tuple[Config, list[str] | None]:
    """The run's :class:`Config` and, with ``--compare``, the optimizers to compare."""
    config, compared, _ = _parse(argv)
    return config, compared


def _parse(argv: list[str] | None) -> tuple[Config, list[str] | None, argparse.Namespace]:
    default = Config()
    parser = ArgumentParser(
        prog="python -m examples.mnist",
        description="Train a Flax NNX model on MNIST with adam_jax.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", default=default.model, choices=sorted(models.MODELS), help="network"
    )
    parser.add_argument(
        "--optimizer",
        default=default.optimizer,
        choices=optimizers.NAMES,
        help="Adam family from adam_jax, baselines from optax",
    )
    parser.add_argument("--epochs", type=int, default=default.epochs, help="epochs to train")
    parser.add_argument("--batch-size", type=int, default=default.batch_size, help="batch size")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=default.learning_rate,
        help="peak learning rate (None: the optimizer's tuned rate)",
    )
    parser.add_argument(
        "--schedule",
        default=default.schedule,
        choices=optimizers.SCHEDULES,
        help="learning-rate schedule",
    )
    parser.add_argument(
        "--warmup-epochs", type=float, default=default.warmup_epochs, help="linear warmup length"
    )
    parser.add_argument(
        "--max-shift",
        type=int,
        default=default.max_shift,
        help="augmentation: random shifts of up to this many pixels (0: none)",
    )
    parser.add_argument(
        "--seed", type=int, default=default.seed, help="initialization, data order, augmentation"
    )
    parser.add_argument(
        "--dataset", default=default.dataset, choices=sorted(data.DATASETS), help="dataset"
    )
    parser.add_argument(
        "--data-dir",
        default=default.data_dir,
        help=f"the folder holding the four files (None: ${data.ENV_DATA_DIR}, then "
        "~/.cache/adam_jax/<dataset>, downloading there)",
    )
    parser.add_argument(
        "--train-limit", type=int, default=default.train_limit, help="train on the first N images"
    )
    parser.add_argument(
        "--eval-batch-size",
        type=int,
        default=default.eval_batch_size,
        help="batch size of the evaluation on the full test set",
    )
    parser.add_argument(
        "--workdir", default=default.workdir, help="metrics, checkpoints and plots go here"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest intact checkpoint in --workdir",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=default.checkpoint_every,
        metavar="STEPS",
        help="checkpoint every STEPS optimizer steps (None: at the end of each epoch)",
    )
    parser.add_argument(
        "--keep-checkpoints",
        type=int,
        default=default.keep_checkpoints,
        help="how many of the newest checkpoints to keep",
    )
    parser.add_argument(
        "--log-every",
        type=int,
        default=default.log_every,
        metavar="STEPS",
        help="steps between training-loss records in metrics.jsonl",
    )
    parser.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip steps whose gradient has a NaN or an Inf (optax.apply_if_finite)",
    )
    parser.add_argument(
        "--max-consecutive-skips",
        type=int,
        default=default.max_consecutive_skips,
        help="with --skip-nonfinite: stop after this many skipped steps in a row",
    )
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
    distributed.add_arguments(parser)
    parser.add_argument(
        "--param-dtype",
        default=default.param_dtype,
        choices=PARAM_DTYPES,
        help="storage of the params (the passes compute in float32 either way)",
    )
    parser.add_argument(
        "--low-precision",
        default=default.low_precision,
        choices=LOW_PRECISION,
        help="updates of bfloat16/float16 params: Kahan summation, stochastic rounding, or "
        "rounded to nearest (none)",
    )
    parser.add_argument(
        "--shard-optimizer",
        action="store_true",
        help="split the optimizer state over the devices instead of replicating it (ZeRO-1)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if problem := distributed.check_arguments(args):
        parser.error(problem)
    if args.seeds < 1:
        parser.error(f"--seeds must be an integer >= 1, got {args.seeds}")
    if args.compare is not None:
        unknown = sorted(set(args.compare) - set(optimizers.NAMES))
        if unknown or not args.compare:
            parser.error(f"--compare: unknown optimizers {unknown}; choose from {optimizers.NAMES}")
    try:
        config = Config(
            model=args.model,
            optimizer=args.optimizer,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            schedule=args.schedule,
            warmup_epochs=args.warmup_epochs,
            max_shift=args.max_shift,
            seed=args.seed,
            dataset=args.dataset,
            data_dir=args.data_dir,
            train_limit=args.train_limit,
            eval_batch_size=args.eval_batch_size,
            workdir=args.workdir,
            resume=args.resume,
            checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints,
            log_every=args.log_every,
            skip_nonfinite=args.skip_nonfinite,
            max_consecutive_skips=args.max_consecutive_skips,
            devices=args.devices,
            shard_optimizer=args.shard_optimizer,
            param_dtype=args.param_dtype,
            low_precision=args.low_precision,
            progress=not args.no_progress,
        )
    except ValueError as err:
        parser.error(str(err))
    return config, args.compare, args


def resume_command(argv: list[str], num_processes: int = 1) -> str:
    """The command line that continues the run of ``argv``: with several processes, the
    launcher's, which starts them all."""
    resume = [] if "--resume" in argv else ["--resume"]
    if num_processes == 1:
        return shlex.join(["python", "-m", "examples.mnist", *argv, *resume])
    kept = _without_options(argv, PROCESS_OPTIONS)
    launcher = ["python", "-m", "examples.mnist.launch", "--num-processes", str(num_processes)]
    return shlex.join([*launcher, *kept, *resume])


def _without_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    config, compared, args = _parse(argv)
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
        _, history = train.train_and_evaluate(config, dataset, console)
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
    console.print(train.summary(config, history))
