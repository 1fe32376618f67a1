"""Command line of the language-model example: ``python -m examples.lm --help``.

``--mesh``, ``--num-processes``, ``--process-id`` and ``--coordinator`` take effect before JAX
starts (:func:`prepare`, which ``python -m examples.lm`` calls first): on CPU the program asks
XLA for as many host devices as the mesh needs in each process. A bad setting ends the program
with one line that names the flag and what it accepts, and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from examples.common import distributed
from examples.common.errors import ArgumentParser, DefaultsHelpFormatter
from examples.common.workdir import workdir_problem
from examples.lm.data import DataError

PROG = "python -m examples.lm"


def add_placement_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mesh",
        default=None,
        metavar="data=D,fsdp=F",
        help="the device mesh: the batch split over data x fsdp, params and optimizer state "
        "over fsdp (default: every device on data)",
    )
    distributed.add_process_arguments(parser)
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="join the other processes as the cluster says (jax.distributed.initialize() "
        "with no arguments: Cloud TPU, Slurm, Open MPI), in place of the three options above",
    )


def prepare(argv: Sequence[str]) -> None:
    """Asks for the host devices ``--mesh`` needs and joins the other processes; must run
    before JAX creates its backend. Exits with status 2 on bad options."""
    from examples.lm.train import parse_mesh  # JAX is imported, not started.

    args = placement(argv)
    if args.mesh is not None and not args.cluster:
        # a cluster's processes bring the devices they have
        devices = math.prod(parse_mesh(args.mesh).values())
        distributed.request_host_devices(devices // args.num_processes)
    if args.cluster:
        distributed.initialize()
    distributed.join(args)


def placement(argv: Sequence[str]) -> argparse.Namespace:
    """The options of :func:`add_placement_options` in ``argv``; exits with status 2 on a bad
    one."""
    from examples.lm.train import ConfigError, parse_mesh

    parser = ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False)
    add_placement_options(parser)
    args, _ = parser.parse_known_args(argv)
    if args.cluster and (args.num_processes > 1 or args.coordinator):
        parser.error(
            "--cluster finds the processes itself: leave out --num-processes and --coordinator"
        )
    if problem := distributed.check_process_arguments(args):
        parser.error(problem)
    if args.mesh is not None:
        try:
            devices = math.prod(parse_mesh(args.mesh).values())
        except ConfigError as error:
            parser.error(str(error))
        if devices % args.num_processes:
            parser.error(
                f"--mesh {args.mesh} has {devices} devices, which --num-processes "
                f"{args.num_processes} does not divide: every process brings as many"
            )
    return args


def option_value(text: str) -> Any:
    """A Python literal (``0.9``, ``True``, ``None``, ``(0.9, 0.95)``), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parser() -> argparse.ArgumentParser:
    from examples.lm.model import ModelConfig
    from examples.lm.train import SCHEDULES, Config
    from examples.mnist.optimizers import MOMENTS, SECOND_MOMENTS

    model, config = ModelConfig(), Config()
    p = ArgumentParser(
        prog=PROG,
        description="Train a GPT-style byte-level language model with adam_jax.",
        formatter_class=DefaultsHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a text file or a folder of them (default: Python's standard-library source)",
    )
    p.add_argument("--steps", type=int, default=config.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=config.batch_size, help="windows a step")
    p.add_argument(
        "--grad-accumulation",
        type=int,
        default=config.grad_accumulation,
        metavar="N",
        help="split each step's batch into N micro-batches (N divides --batch-size) whose "
        "gradients are summed inside the step, then one update: the activations' memory of "
        "one micro-batch",
    )
    p.add_argument("--seq-len", type=int, default=model.seq_len, help="bytes a window")
    p.add_argument("--layers", type=int, default=model.layers, help="transformer blocks")
    p.add_argument("--d-model", type=int, default=model.d_model, help="width")
    p.add_argument("--heads", type=int, default=model.heads, help="attention heads")
    p.add_argument("--optimizer", default=config.optimizer, help="a name of adam_jax.registry")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option of the optimizer (repeatable), e.g. --opt b2=0.99",
    )
    p.add_argument("--learning-rate", type=float, default=config.learning_rate, help="peak")
    p.add_argument(
        "--schedule", choices=SCHEDULES, default=config.schedule, help="of the learning rate"
    )
    p.add_argument("--zero1", action="store_true", help="split the optimizer state over data too")
    p.add_argument(
        "--moments", choices=tuple(MOMENTS), default=config.moments, help="how moments are stored"
    )
    p.add_argument(
        "--second-moment",
        choices=tuple(SECOND_MOMENTS),
        default=config.second_moment,
        help="factored: Adafactor's row and column means in place of the second moment",
    )
    p.add_argument(
        "--offload-state",
        action="store_true",
        help="keep the optimizer state in host memory between steps (adam_jax.offload_state)",
    )
    p.add_argument(
        "--param-dtype",
        choices=("float32", "bfloat16"),
        default=model.param_dtype,
        help="storage of the params",
    )
    p.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16"),
        default=model.compute_dtype,
        help="the dtype of the matrix products and attention (mixed precision: the params, "
        "gradients, optimizer state, norms and loss stay float32); --param-dtype bfloat16 "
        "computes in bfloat16 whichever this is",
    )
    p.add_argument(
        "--low-precision",
        choices=("none", "kahan", "stochastic"),
        default=config.low_precision,
        help="how bfloat16 params take their updates",
    )
    p.add_argument(
        "--seed", type=int, default=config.seed, help="initialization and training windows"
    )
    p.add_argument(
        "--time-optimizer",
        action="store_true",
        help="after training, time the optimizer's update alone (10 in a row on copies of the "
        "params and state; a compilation of its own) and print its share of the step (in "
        "--workdir also optimizer_share.json)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=config.eval_every,
        metavar="STEPS",
        help="steps between records (training and held-out loss)",
    )
    p.add_argument(
        "--eval-windows",
        type=int,
        default=config.eval_windows,
        help="held-out windows of each evaluation",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where metrics.jsonl, the checkpoints and curves.png go (default: no files)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        metavar="STEPS",
        help="steps between checkpoints, whatever --eval-every is (and one at the end and on "
        "SIGTERM)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest intact checkpoint in --workdir: what a run does "
        "without --restart (a requeued job's same command continues)",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="start over, although --workdir holds checkpoints; the previous run's files stay "
        "until this run's first checkpoint",
    )
    add_placement_options(p)
    return p


def config_from(args: argparse.Namespace) -> Any:
    """The run's :class:`~examples.lm.train.Config`; raises ConfigError naming a bad flag."""
    from examples.lm.model import ModelConfig
    from examples.lm.train import Config, ConfigError, check_accumulation, parse_mesh

    for flag in (
        "steps",
        "batch_size",
        "seq_len",
        "layers",
        "d_model",
        "heads",
        "eval_every",
        "eval_windows",
        "checkpoint_every",
        "grad_accumulation",
    ):
        if getattr(args, flag) < 1:
            raise ConfigError(
                f"--{flag.replace('_', '-')} must be an integer >= 1, got {getattr(args, flag)}"
            )
    if not args.learning_rate > 0:
        raise ConfigError(f"--learning-rate must be > 0, got {args.learning_rate}")
    options = {}
    for item in args.opt:
        name, equals, value = item.partition("=")
        if not equals or not name.isidentifier():
            raise ConfigError(f"--opt {item}: expected NAME=VALUE, e.g. --opt b2=0.99")
        options[name] = option_value(value)
    if args.d_model % args.heads:
        raise ConfigError(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    check_accumulation(args.batch_size, args.grad_accumulation)
    return Config(
        model=ModelConfig(
            layers=args.layers,
            d_model=args.d_model,
            heads=args.heads,
            seq_len=args.seq_len,
            param_dtype=args.param_dtype,
            compute_dtype=args.compute_dtype,
        ),
        optimizer=args.optimizer,
        options=options,
        learning_rate=args.learning_rate,
        schedule=args.schedule,
        steps=args.steps,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        eval_windows=args.eval_windows,
        mesh=None if args.mesh is None else parse_mesh(args.mesh),
        zero1=args.zero1,
        moments=args.moments,
        second_moment=args.second_moment,
        low_precision=args.low_precision,
        offload_state=args.offload_state,
        grad_accumulation=args.grad_accumulation,
        seed=args.seed,
    )


def checked_config(args: argparse.Namespace) -> Any:
    """The run's :class:`~examples.lm.train.Config` once every option that the devices do
    not decide is known good: the optimizer and its options, ``--data`` (found, not read)
    and the work directory (that it can be made). Raises ConfigError or DataError naming a bad
    one."""
    from examples.lm import data, train

    config = config_from(args)
    for flag in ("resume", "restart"):
        if getattr(args, flag) and args.workdir is None:
            raise train.ConfigError(f"--{flag} needs --workdir, where the checkpoints are")
    if args.resume and args.restart:
        raise train.ConfigError("--resume and --restart: choose one")
    train.registry_optimizer(config, config.learning_rate, config.mesh)
    if args.data is not None:
        data.text_files(args.data)
    if args.workdir is not None and (problem := workdir_problem(args.workdir)):
        raise train.ConfigError(problem)
    return config


def check_launch(argv: list[str]) -> bool:
    """What ``python -m examples.lm.launch`` checks before it starts the processes of
    ``argv`` (:func:`examples.common.launch.main`): exits with status 2 on a bad option;
    returns whether the run keeps checkpoints (``--workdir``)."""
    from examples.lm.train import ConfigError

    placement(argv)
    p = parser()
    args = p.parse_args(argv)
    try:
        checked_config(args)
    except (ConfigError, DataError) as error:
        p.error(str(error))
    return args.workdir is not None


def main(argv: Sequence[str] | None = None) -> None:
    import jax
    from rich.console import Console

    import adam_jax
    from examples.common.errors import Interrupted, TrainingError
    from examples.lm import data, loop
    from examples.lm.train import ConfigError, Trainer, make_mesh, placement_note
    from examples.mnist.console import progress_bar

    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    try:
        config = checked_config(args)
        corpus = data.Corpus(data.load(args.data), config.model.seq_len)
    except (ConfigError, DataError) as error:
        p.error(str(error))
    try:
        mesh = make_mesh(config.mesh)
        trainer = Trainer(config, mesh)
    except ConfigError as error:
        # What the options make of the devices, the same in every process: the first says so.
        if jax.process_index() == 0:
            p.error(str(error))
        raise SystemExit(2) from error
    primary = jax.process_index() == 0
    console = Console(quiet=not primary, soft_wrap=True)
    console.print(
        f"{trainer.param_count / 1e6:.2f}M params, {config.optimizer}, mesh "
        f"{dict(mesh.shape)} over {jax.process_count()} process(es), "
        f"{len(corpus.train):,} training bytes"
    )
    if note := placement_note(config, dict(mesh.shape)):
        console.print(note)
    with progress_bar(primary, console) as progress:
        task = progress.add_task("training", total=config.steps, status="")

        def report(record: dict[str, Any]) -> None:
            status = (
                f"train {record['train_loss']:.4f}  held-out {record['held_out_loss']:.4f}  "
                f"{record['tokens_per_second']:,.0f} tokens/s"
            )
            if "model_flops_utilization" in record:
                status += f"  MFU {record['model_flops_utilization']:.1%}"
            progress.update(task, completed=record["step"], status=status)
            progress.console.print(f"step {record['step']:>6}/{config.steps}  {status}")

        def warn(message: str) -> None:
            progress.console.print(f"[yellow]warning:[/yellow] {message}")

        def note(message: str) -> None:
            progress.console.print(message)
            if message.startswith("resuming from step "):
                progress.update(task, completed=int(message.split()[3]))

        options = loop.RunOptions(
            workdir=args.workdir,
            checkpoint_every=args.checkpoint_every,
            restart=args.restart,
            report=report,
            stepped=lambda step: progress.update(task, completed=step),
            warn=warn,
            note=note,
        )
        run = None
        try:
            run = loop.Run(trainer, corpus, options)
            run.train()
        except Interrupted as error:
            # Every process stops after the same step; the first one says so.
            if primary:
                draw_curves(run, trainer, console)
                print(f"{PROG}: {error}\n{next_step(argv, args)}", file=sys.stderr)
            raise SystemExit(error.exit_status) from error
        except TrainingError as error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            raise SystemExit(error.exit_status) from error
        except (RuntimeError, ValueError) as error:
            if not distributed.lost_peer(error):
                raise
            distributed.end_for_lost_peer(PROG, error, next_step(argv, args))
    state_bytes = loop.state_bytes_per_param(trainer)
    fullest = adam_jax.device_state_bytes(trainer.opt_state) / trainer.param_count
    where = "in host memory, off the device between steps" if config.offload_state else ""
    console.print(
        f"optimizer state: {state_bytes:.2f} bytes per parameter, {fullest:.2f} on the "
        f"fullest device {where}".strip()
    )
    if args.time_optimizer and run is not None and run.records:
        console.print(loop.describe_share(run.optimizer_share()))
    if primary:
        draw_curves(run, trainer, console)


def next_step(argv: list[str], args: argparse.Namespace) -> str:
    """What continues a run of ``argv`` that stopped: the command that resumes it from its
    checkpoints, or without ``--workdir`` that there are none."""
    from examples.common import launch

    if args.workdir is None:
        return (
            "Without --workdir there is no checkpoint to resume from; add --workdir DIR to "
            "keep them"
        )
    return f"Resume with: {launch.resume_command('examples.lm', argv, args.num_processes)}"


def draw_curves(run: Any, trainer: Any, console: Any) -> None:
    """``curves.png`` of the records of ``run`` so far, beside its ``metrics.jsonl`` (none
    without a work directory or a record)."""
    from examples.lm import loop, plots

    if run is None or run.workdir is None or not run.records:
        return
    path = run.workdir.metrics_path.parent / "curves.png"
    state_bytes = loop.state_bytes_per_param(trainer)
    figure = plots.curves_figure(run.records, trainer.config, state_bytes)
    try:
        figure.savefig(path, dpi=100)
    except OSError as error:
        console.print(f"[yellow]warning:[/yellow] could not write {path} ({error})")
        return
    console.print(f"curves: {path}")
