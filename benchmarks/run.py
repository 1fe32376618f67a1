"""Benchmarks of adam_jax side by side with ``optax.adam``, written to one JSON file.

    python -m benchmarks.run --out benchmarks/results/cpu.json [--quick] [--sections ...]

Sections (``--sections``; by default all, ``billion`` only on a GPU):

* ``state_bytes``: optimizer state bytes per parameter for each moment storage option
* ``steps``: Adam step time and GB/s on 16M float32 params in 1 to 1000 leaves, vs floor kernels
* ``leaves``: step time of adam_jax.adam over optax.adam on 1 x 4M, 64 x 64k and 64 x 1k leaves
* ``leaf_cost``: kernels, the host's per-argument cost and step time on 1, 100 and 1000 leaves
* ``eight_bit``: step time of 8-bit moments over float32 moments on 1 x 4M params
* ``compile``: tracing and XLA compile time of the jitted step for 100 to 3000 leaves
* ``train_step``: full train step (forward, backward, optimizer) of the MNIST CNN and a transformer
* ``billion``: one step on 1B float32 parameters (GPU only)
* ``scaling``: ZeRO-1 on 1 to 8 devices, state bytes per device and step time (~100M params)
* ``variants``: every variant of the modern Adam family against optax's namesake and adamw
* ``low_precision``: step time of Kahan summation and stochastic rounding on bfloat16 params
* ``memory``: bytes per parameter of params + state and of the compiled step, per memory setting
* ``memory_step_time``: step time of each memory setting against the 8-bit moments' step
* ``soap``: SOAP's step against adamw's on transformer matrices, the eigenbasis updates' share
* ``soap_branches``: what a branch of the step costs, and SOAP's step with its phase chosen
  once for the whole tree
* ``soap_state``: SOAP's state bytes per parameter at GPT-2 small's shapes, per setting
* ``soap_steps``: how evenly blocked SOAP's refreshes fall over its steps, staggered and not
* ``offload``: device bytes and step time with the optimizer state in host memory

Every section times its variants interleaved (round robin, rotating start) and reports
medians; see ``benchmarks.harness``. A re-run section replaces its rows in the JSON file, the
others are kept. ``benchmarks.summarize`` turns the file into the tables of docs/speed.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax

from benchmarks.harness import ResultsFile, Row, Settings
from benchmarks.sections import (
    billion,
    compile_time,
    eight_bit,
    leaf_cost,
    leaves,
    low_precision,
    memory,
    memory_step_time,
    offload,
    scaling,
    soap,
    soap_branches,
    soap_state,
    soap_steps,
    state_bytes,
    steps,
    train_step,
    variants,
)


class Section(NamedTuple):
    run: Callable[[Settings], list[Row]]
    description: str
    gpu_only: bool = False


SECTIONS: dict[str, Section] = {
    "state_bytes": Section(
        state_bytes.run, "optimizer state bytes per parameter for each moment storage option"
    ),
    "steps": Section(
        steps.run,
        "Adam step time and GB/s on 16M float32 params in 1 to 1000 leaves, vs floor kernels",
    ),
    "leaves": Section(
        leaves.run,
        "step time of adam_jax.adam over optax.adam on 1 x 4M, 64 x 64k and 64 x 1k leaves",
    ),
    "leaf_cost": Section(
        leaf_cost.run,
        "kernels, the host's per-argument cost and step time on 1, 100 and 1000 leaves",
    ),
    "eight_bit": Section(
        eight_bit.run, "step time of 8-bit moments over float32 moments on 1 x 4M params"
    ),
    "compile": Section(
        compile_time.run, "tracing and XLA compile time of the jitted step for 100 to 3000 leaves"
    ),
    "train_step": Section(
        train_step.run,
        "full train step (forward, backward, optimizer) of the MNIST CNN and a transformer",
    ),
    "billion": Section(billion.run, "one step on 1B float32 parameters (GPU only)", gpu_only=True),
    "scaling": Section(
        scaling.run,
        "ZeRO-1 on 1 to 8 devices: state bytes per device and step time of ~100M params",
    ),
    "variants": Section(
        variants.run, "every variant's step against optax's namesake and adam_jax.adamw"
    ),
    "low_precision": Section(
        low_precision.run,
        "step time of Kahan summation and stochastic rounding on bfloat16 params",
    ),
    "memory": Section(
        memory.run,
        "bytes per parameter of params + state and of the compiled step, per memory setting",
    ),
    "memory_step_time": Section(
        memory_step_time.run, "step time of each memory setting against the 8-bit moments' step"
    ),
    "soap": Section(
        soap.run,
        "SOAP's step against adamw's on transformer matrices, the eigenbasis updates' share",
    ),
    "soap_branches": Section(
        soap_branches.run,
        "what a branch of the step costs, and SOAP's step with its phase chosen for the tree",
    ),
    "soap_state": Section(
        soap_state.run, "SOAP's state bytes per parameter at GPT-2 small's shapes, per setting"
    ),
    "soap_steps": Section(
        soap_steps.run,
        "how evenly blocked SOAP's refreshes fall over its steps, staggered and not",
    ),
    "offload": Section(
        offload.run, "device bytes and step time with the optimizer state in host memory"
    ),
}
# Sections drawn by benchmarks.plot: the plot is redrawn when one of them ran.
PLOTTED = {"steps", "compile", "state_bytes"}


class Stopped(Exception):
    """The run got SIGTERM (``timeout``, a lent device's time running out)."""


def _stop(signum: int, frame: Any) -> None:
    raise Stopped


def default_sections() -> list[str]:
    on_gpu = jax.default_backend() == "gpu"
    return [name for name, section in SECTIONS.items() if on_gpu or not section.gpu_only]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    table = "\n".join(f"  {name:12s} {section.description}" for name, section in SECTIONS.items())
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.splitlines()[0],
        epilog="sections:\n" + table,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="benchmarks/results/cpu.json", help="JSON results file")
    parser.add_argument(
        "--sections", nargs="+", choices=list(SECTIONS), help="default: all for this backend"
    )
    parser.add_argument(
        "--repeats", type=int, help="timed calls per variant (default: each section's own)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument(
        "--compile-leaves", type=int, nargs="+", default=list(Settings.compile_leaves)
    )
    parser.add_argument(
        "--plot", help="PNG drawn at the end (default docs/benchmarks_<backend>.png)"
    )
    return parser.parse_args(argv)


def run_sections(sections: list[str], settings: Settings, results: ResultsFile) -> None:
    """Runs and records each section; on SIGTERM, records the rows the section had finished
    and exits with 143."""
    for name in sections:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        settings.finished.clear()
        try:
            rows = SECTIONS[name].run(settings)
        except Stopped:
            if settings.finished:
                seconds = time.perf_counter() - start
                results.record(name, list(settings.finished), seconds, stopped_early=True)
            print(
                f"stopped in {name}: its {len(settings.finished)} finished rows written to "
                f"{results.path}",
                flush=True,
            )
            raise SystemExit(128 + signal.SIGTERM) from None
        results.record(name, rows, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings(
        repeats=args.repeats, quick=args.quick, compile_leaves=tuple(args.compile_leaves)
    )
    sections = args.sections or default_sections()
    command = " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    results = ResultsFile(Path(args.out), command)
    print(json.dumps(results.machine), flush=True)
    previous_handler = signal.signal(signal.SIGTERM, _stop)
    try:
        run_sections(sections, settings, results)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    print(f"results written to {results.path}")
    if PLOTTED.intersection(sections):
        from benchmarks import plot

        png = Path(args.plot or f"docs/benchmarks_{jax.default_backend()}.png")
        plot.plot(results.data, png)
        print(f"plot written to {png}")


if __name__ == "__main__":
    main()
