"""The steps of :mod:`benchmarks.programs` run on the device that is there: each program's
measured time beside the time model's prediction for the same program as compiled there.

Where :mod:`benchmarks.accelerators` compiles for a card that is not there, this compiles for
the one that is (autotuned gemms included), reads the optimized program as that command does
(kernels, copies, host transfers), predicts its time (:mod:`benchmarks.time_model`, the card
named by ``--card``) and times it on real arrays of the tree's shapes, in the same rounds as
the first program (float32 AdamW; :func:`benchmarks.harness.interleaved`), so that its ratio to
it is measured side by side. A row is written once its program has compiled and again once it
is timed, before the next one compiles: a run stopped by ``timeout`` keeps what it had.

    python -m benchmarks.measured_programs --tree gpt2 --card h200 \
        --programs adamw adamw_8bit "4-bit moments" --out benchmarks/results/programs_h200.json

On a CPU (``--tree small``) it is a smoke test: the time model is a GPU's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import optax

import adam_jax
from benchmarks import programs, time_model
from benchmarks.harness import Runner, adam_step, interleaved, machine_info
from benchmarks.hlo_program import read_program

REPEATS = 20


def _real_args(
    setting: programs.Setting, tree: str, tx: optax.GradientTransformation
) -> tuple[Any, Any, Any]:
    """``(params, grads, state)`` on the default device (as ``FlatParams`` where the setting
    says so), the state in host memory where the setting offloads it (its ``init`` places
    it)."""
    if setting.layout not in ("tree", "flat"):
        raise ValueError(f"layout {setting.layout!r}: only the 'tree' and 'flat' layouts run here")
    shapes = programs.TREES[tree]()
    keys = iter(jax.random.split(jax.random.key(0), 2 * len(jax.tree.leaves(shapes))))

    def leaf(x: jax.ShapeDtypeStruct, scale: float) -> jax.Array:
        return (scale * jax.random.normal(next(keys), x.shape)).astype(setting.param_dtype)

    params = jax.tree.map(lambda x: leaf(x, 0.02), shapes)
    grads = jax.tree.map(lambda x: leaf(x, 1e-3), shapes)
    if setting.layout == "flat":
        params, grads = adam_jax.FlatParams.from_tree(params), adam_jax.FlatParams.from_tree(grads)
    return params, grads, tx.init(params)


def compiled_runner(name: str, tree: str, card: str | None) -> tuple[Runner, dict[str, Any]]:
    """The program of ``name`` compiled for the default device, its runner and its row."""
    setting = programs.SETTINGS[name]
    tx = programs.transformation(setting, tree)
    params, grads, state = _real_args(setting, tree, tx)
    runner = Runner(name, adam_step(tx), params, grads, state)
    start = time.perf_counter()
    compiled = runner.fn.lower(params, grads, state).compile()
    compile_s = time.perf_counter() - start
    runner.fn = compiled  # called as the jitted step is: donating params and state
    program = read_program(compiled.as_text())
    summary = program.summary()
    row: dict[str, Any] = {
        "program": name,
        "tree": tree,
        "kernels": summary["kernels"],
        "copies": summary["copies"],
        "host_transfers": summary["host_transfers"],
        "host_kernels": summary["host_kernels"],
        "kernel_bytes": summary["kernel_bytes"],
        "compile_s": round(compile_s, 3),
    }
    if card is not None:
        row["predicted_ms"] = round(1e3 * time_model.predict(program, card), 4)
    return runner, row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.measured_programs")
    parser.add_argument("--tree", choices=list(programs.TREES), default="gpt2")
    parser.add_argument("--programs", nargs="+", default=["adamw", "adamw_8bit", "4-bit moments"])
    parser.add_argument("--card", choices=list(time_model.CARDS), help="the time model's card")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.programs) - set(programs.SETTINGS))
    if unknown:
        parser.error(f"unknown programs {unknown}: choose from {programs.names()}")

    report: dict[str, Any] = {"machine": machine_info(), "repeats": args.repeats, "rows": []}

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_suffix(".partial")
        partial.write_text(json.dumps(report, indent=2) + "\n")
        partial.replace(args.out)

    first: Runner | None = None
    for name in args.programs:
        try:
            runner, row = compiled_runner(name, args.tree, args.card)
        except Exception as error:  # noqa: BLE001  (recorded: the other programs still run)
            report["rows"].append({"program": name, "error": f"{type(error).__name__}: {error}"})
            write()
            continue
        report["rows"].append(row)
        write()
        print(json.dumps(row), flush=True)
        if first is None:
            first, first_row = runner, row
            interleaved([first], args.repeats)
        else:
            # Timed beside the first program, in the same rounds: its ratio measured side by
            # side, and written before the next program compiles.
            count = len(first.times)
            interleaved([first, runner], args.repeats)
            row["ratio_vs_first"] = round(
                statistics.median(
                    t / f for t, f in zip(runner.times, first.times[count:], strict=True)
                ),
                4,
            )
            runner.release()
        row["median_ms"] = round(1e3 * runner.median, 4)
        first_row["median_ms"] = round(1e3 * first.median, 4)
        write()
        print(
            f"{name:45s} measured {row['median_ms']:9.3f} ms  "
            f"predicted {row.get('predicted_ms', float('nan')):9.3f} ms  "
            f"x{row.get('ratio_vs_first', 1.0):.3f} of {first.name}",
            flush=True,
        )


if __name__ == "__main__":
    main()
