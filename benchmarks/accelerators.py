"""Compile any step for a GPU or a TPU that is not there, and read what XLA made of it.

XLA compiles for an accelerator without one ("deviceless" ahead-of-time compilation): the
CUDA plugin registers without a driver when jax runs on the CPU, takes a card's
``GpuTargetConfigProto`` (``benchmarks/targets/``, written from the cards' datasheets) and
makes a topology of its devices; libtpu makes a TPU slice's. Arrays placed on those devices
as ``ShapeDtypeStruct``s lower and compile as on the machine itself, and
``Compiled.as_text()`` is the optimized, scheduled program, which
:mod:`benchmarks.hlo_program` reads. Nothing is autotuned: a real card may pick other gemm
kernels; fusions, solver calls, loops and copies do not depend on that.

A topology's devices list no memories, so ``sharding.with_memory_kind("pinned_host")`` gives
them a sharding of no memory kind, and an argument meant for host memory lowers as a device
argument: XLA then compiles a program that reads it where it lies, which no real card runs
(jax on the card marks such an argument ``mhlo.memory_kind = "pinned_host"``).
:func:`compile_for` marks the arrays its ``host_leaves`` name so, as jax does on a card.

The plugins are kept out of the project's environment (installed, they make every jax
program try a CUDA and a TPU backend at start-up and log that they failed): ``bash
.ci/install_accelerators`` installs them into ``.accelerators/`` for the installed jaxlib,
and :func:`enable` puts that folder on ``sys.path`` before jax is imported. So the
command runs in a process of its own::

    python -m benchmarks.accelerators                       # every program, small tree, H100
    python -m benchmarks.accelerators --trees small gpt2 --targets h100 v5p --out report.json
    python -m benchmarks.accelerators --programs adamw soap --markdown

Each row: kernels (and fusions by kind), custom calls by target, while loops (and those of
unknown trip count), conditionals and the kernels of each branch, copies, host transfers and
kernels on host memory, device bytes (arguments, outputs, temporaries, aliased) and the
compile's seconds; on a GPU also the time model's prediction (:mod:`benchmarks.time_model`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: Where ``.ci/install_accelerators`` puts the CUDA plugin and libtpu.
PLUGINS = Path(os.environ.get("ADAM_JAX_ACCELERATOR_PLUGINS", REPO / ".accelerators"))
INSTALL_HINT = (
    "the accelerator compilers are not installed: run `bash .ci/install_accelerators` "
    f"(the CUDA plugin and libtpu for the installed jaxlib, into {PLUGINS})"
)
TARGET_SPECS = Path(__file__).resolve().parent / "targets"


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator to compile for."""

    name: str
    platform: str  # "cuda" or "tpu"
    description: str
    spec: str = ""  # a GPU's GpuTargetConfigProto file under benchmarks/targets/
    tpu_topology: str = ""  # a TPU slice's topology name; its chips are the devices


TARGETS: dict[str, Target] = {
    "h100": Target("h100", "cuda", "NVIDIA H100 SXM 80GB", spec="h100_sxm.txtpb"),
    "h200": Target("h200", "cuda", "NVIDIA H200 141GB", spec="h200.txtpb"),
    "v5p": Target("v5p", "tpu", "TPU v5p (a 2x2x1 slice)", tpu_topology="v5p:2x2x1"),
    "v5e": Target("v5e", "tpu", "TPU v5e (a 2x2 slice)", tpu_topology="v5e:2x2"),
}


def available() -> bool:
    """Whether the plugins are installed where :func:`enable` looks."""
    return (PLUGINS / "jax_plugins").is_dir() and (PLUGINS / "libtpu").is_dir()


def enable() -> None:
    """Makes the CUDA plugin and libtpu importable and keeps jax's own backend the CPU's.

    Call it before jax is imported: jaxlib registers the CUDA plugin's library kernels
    (cuSOLVER's ``syevd``, ``potrf``) as it is imported, and the plugins' backends when the
    backends start. So this module and its callers import jax inside their functions.

    Raises:
      RuntimeError: where the plugins are not installed (the message says how to).
    """
    if not available():
        raise RuntimeError(INSTALL_HINT)
    if str(PLUGINS) not in sys.path:
        sys.path.append(str(PLUGINS))
    # libtpu looks for a TPU VM's metadata at start-up; there is none to find.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    import jax

    jax.config.update("jax_platforms", "cpu")


def enable_or_exit(parser: argparse.ArgumentParser) -> None:
    """:func:`enable`, or the command's exit with the line that says how to install the
    plugins."""
    try:
        enable()
    except RuntimeError as error:
        parser.exit(2, f"{parser.prog}: {error}\n")


def devices(target: Target, count: int = 1) -> list[Any]:
    """``count`` devices of ``target`` (a GPU topology of ``count`` cards, or the chips of a
    TPU slice)."""
    from jax.experimental import topologies

    if target.platform == "cuda":
        topology = topologies.get_topology_desc(
            platform="cuda",
            target_config=(TARGET_SPECS / target.spec).read_text(),
            topology=f"1x1x{count}",
        )
    else:
        topology = topologies.get_topology_desc(topology_name=target.tpu_topology, platform="tpu")
    found = list(topology.devices)
    if len(found) < count:
        raise ValueError(f"{target.name} has {len(found)} devices, {count} asked for")
    return found[:count]


def placed(tree: Any, sharding: Any) -> Any:
    """``tree``'s arrays as ``ShapeDtypeStruct``s with ``sharding`` (one, or a tree of them)."""
    import jax

    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding
    )


@dataclasses.dataclass
class Compiled:
    """A program compiled for a target: its optimized text, device bytes and compile time
    (``compile_s``, of which ``lower_s`` is jax's tracing and lowering to StableHLO)."""

    text: str
    memory: dict[str, int]
    compile_s: float
    lower_s: float = 0.0


def _mark_host_arguments(
    lowered: Any, args: tuple[Any, ...], host_leaves: Mapping[int, Sequence[bool]]
) -> None:
    """Marks the arrays of ``args[i]`` that ``host_leaves[i]`` flags (one flag a leaf, in
    flattening order) as host-memory arguments of ``lowered``'s module (``mhlo.memory_kind =
    "pinned_host"``, as jax writes them on a card), in place. The module's arguments are
    ``args``' leaves in order, after any jax puts first (hoisted constants); every argument
    must have been kept."""
    import jax
    from jax.extend.mlir import ir

    leaves = [jax.tree.leaves(a) for a in args]
    module = lowered.compiler_ir("stablehlo")
    with module.context:
        (main,) = [
            op
            for op in module.body.operations
            if "sym_name" in op.attributes
            and ir.StringAttr(op.attributes["sym_name"]).value == "main"
        ]
        attributes = list(main.attributes["arg_attrs"])
        first = len(attributes) - sum(len(group) for group in leaves)
        if first < 0:
            raise ValueError(
                f"the lowered step has {len(attributes)} arguments for "
                f"{sum(len(g) for g in leaves)} arrays: compile it with keep_unused=True"
            )
        position = first
        for argnum, group in enumerate(leaves):
            flags = host_leaves.get(argnum, [False] * len(group))
            if len(flags) != len(group):
                raise ValueError(
                    f"argument {argnum} has {len(group)} arrays, host_leaves {len(flags)} flags"
                )
            for k, host in enumerate(flags, start=position):
                if host:
                    fields = {a.name: a.attr for a in ir.DictAttr(attributes[k])}
                    fields["mhlo.memory_kind"] = ir.StringAttr.get("pinned_host")
                    attributes[k] = ir.DictAttr.get(fields)
            position += len(group)
        main.attributes["arg_attrs"] = ir.ArrayAttr.get(attributes)


def compile_for(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    donate_argnums: tuple[int, ...] = (),
    out_shardings: Any = None,
    keep_unused: bool = False,
    host_leaves: Mapping[int, Sequence[bool]] | None = None,
) -> Compiled:
    """``jax.jit(fn)`` lowered on ``args`` (placed ``ShapeDtypeStruct``s) and compiled; the
    arrays of ``args[i]`` that ``host_leaves[i]`` flags in host memory (every argument is then
    kept, so that the module's arguments are the leaves of ``args``)."""
    import jax

    options: dict[str, Any] = {
        "donate_argnums": donate_argnums,
        "keep_unused": keep_unused or bool(host_leaves),
    }
    if out_shardings is not None:
        options["out_shardings"] = out_shardings
    start = time.perf_counter()
    lowered = jax.jit(fn, **options).lower(*args)
    lower_s = time.perf_counter() - start
    if host_leaves:
        _mark_host_arguments(lowered, args, host_leaves)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    memory = {
        "arguments": int(analysis.argument_size_in_bytes),
        "outputs": int(analysis.output_size_in_bytes),
        "temporaries": int(analysis.temp_size_in_bytes),
        "aliased": int(analysis.alias_size_in_bytes),
        "host_arguments": int(analysis.host_argument_size_in_bytes),
        "host_temporaries": int(analysis.host_temp_size_in_bytes),
    }
    return Compiled(compiled.as_text(), memory, seconds, lower_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accelerators",
        description="Compile adam_jax's steps for an H100, H200, TPU v5p or v5e that is not "
        "there and report what each program launches.",
    )
    parser.add_argument(
        "--targets", nargs="+", default=["h100"], choices=sorted(TARGETS), help="default: h100"
    )
    parser.add_argument(
        "--trees", nargs="+", default=["small"], choices=["small", "gpt2"], help="default: small"
    )
    parser.add_argument(
        "--programs", nargs="+", default=None, help="the names to compile (default: all)"
    )
    parser.add_argument("--out", type=Path, help="write the rows to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    enable_or_exit(parser)
    from benchmarks import programs

    known = programs.names()
    unknown = sorted(set(args.programs or ()) - set(known))
    if unknown:
        parser.exit(2, f"{parser.prog}: unknown programs {unknown}; known: {', '.join(known)}\n")
    rows = []
    for target in args.targets:
        for tree in args.trees:
            for name in args.programs or known:
                row = programs.report(name, tree, TARGETS[target])
                rows.append(row)
                print(programs.row_line(row), flush=True)
    if args.markdown:
        print(programs.markdown(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
