"""SOAP's programs at GPT-2 small's shapes (or on the small tree), compiled for a GPU or TPU
that is not there: the whole step (its phase chosen by one ``lax.switch``) and each phase's
program alone (the first step, a step between refreshes, a step then every refresh), beside
AdamW's.

Each row gives the kernels, library calls, loops (and those whose trip count the program does
not know), branches, temporaries, the bytes its kernels move (``gb_moved``), compile seconds
(``compile_s``; ``lower_s`` of them is jax's tracing and lowering, the rest XLA's, which
compiles the kernels on as many cores as the machine has) and, for a GPU, the time model's
milliseconds (``model_ms`` with a branch's cheapest side, ``model_dearest_ms`` with its
dearest: Cholesky QR's passes past the first two). A phase's program is SOAP's with its phase
pinned (its rule's ``phase_of`` answering it), so that each is measured without the others.

    python -m benchmarks.soap_phases --target h100 --out benchmarks/results/soap_phases_h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any
from unittest import mock

from benchmarks import accelerators

PHASES = ("whole", "first", "step", "refresh")


def settings() -> dict[str, Any]:
    """The optimizers measured: AdamW, SOAP's defaults and the setting to use (docs/memory.md),
    leaf by leaf and with their state stacked by block shape (``stack_blocks=True``), stacked
    with their first bases by a refresh of the identity (``first_basis="power"``)."""
    import jax.numpy as jnp

    import adam_jax
    from benchmarks.harness import LR

    practical = {
        "block_size": 128,
        "factor_dtype": jnp.bfloat16,
        "basis_dtype": jnp.bfloat16,
        "mu_dtype": adam_jax.BlockwiseQuantized(),
        "nu_dtype": jnp.bfloat16,
        "basis_rectification": 0,
    }
    return {
        "adamw": lambda: adam_jax.adamw(LR),
        "soap": lambda: adam_jax.soap(LR),
        "the setting to use": lambda: adam_jax.soap(LR, **practical),
        "soap, stacked": lambda: adam_jax.soap(LR, stack_blocks=True),
        "the setting to use, stacked": lambda: adam_jax.soap(LR, stack_blocks=True, **practical),
        "soap, stacked, power start": lambda: adam_jax.soap(
            LR, stack_blocks=True, first_basis="power"
        ),
        "the setting to use, stacked, power start": lambda: adam_jax.soap(
            LR, stack_blocks=True, first_basis="power", **practical
        ),
    }


def measure(
    name: str, phase: str, target: accelerators.Target, tree: str = "gpt2"
) -> dict[str, Any]:
    """One row: the program of ``name`` (its ``phase`` alone, or the whole switch)."""
    import adam_jax
    from benchmarks import programs, time_model
    from benchmarks.hlo_program import read_program

    setting = programs.Setting(settings()[name])
    soap_rule = adam_jax.registry.get("soap").rule
    pinned = (
        mock.patch.object(soap_rule, "phase_of", lambda self, count: PHASES.index(phase) - 1)
        if phase != "whole"
        else contextlib.nullcontext()
    )
    with pinned:
        compiled = programs.step_args(setting, tree, target).compile()
    program = read_program(compiled.text)
    summary = program.summary()
    row: dict[str, Any] = {
        "target": target.name,
        "tree": tree,
        "program": name,
        "phase": phase,
        "kernels": summary["kernels"],
        "custom_calls": summary["custom_calls"],
        "while_loops": len(program.loops),
        "unknown_trip_loops": program.unknown_trip_loops,
        "conditionals": len(program.conditionals),
        "temporaries_mib": round(compiled.memory["temporaries"] / 2**20, 1),
        # The program reader's sum of the kernels' operand and result bytes.
        "gb_moved": round(summary["kernel_bytes"] / 1e9, 2),
        "compile_s": round(compiled.compile_s, 2),
        "lower_s": round(compiled.lower_s, 2),
    }
    if target.name in time_model.CARDS:
        for key, branch in (("model_ms", "cheapest"), ("model_dearest_ms", "dearest")):
            row[key] = round(1e3 * time_model.predict(program, target.name, branch=branch), 3)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soap_phases", description=__doc__)
    parser.add_argument("--target", default="h100", choices=sorted(accelerators.TARGETS))
    parser.add_argument("--tree", default="gpt2", choices=["small", "gpt2"], help="default: gpt2")
    parser.add_argument(
        "--programs",
        nargs="+",
        default=None,
        help="adamw, soap, 'the setting to use', each with ', stacked' and ', stacked, power "
        "start' (default: all)",
    )
    parser.add_argument(
        "--phases",
        nargs="+",
        default=list(PHASES),
        choices=PHASES,
        help="the phases of each SOAP program (default: all; AdamW's whole step regardless)",
    )
    parser.add_argument("--out", type=Path, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    accelerators.enable_or_exit(parser)
    target = accelerators.TARGETS[args.target]
    rows = []
    for name in args.programs or list(settings()):
        for phase in ("whole",) if name == "adamw" else args.phases:
            row = measure(name, phase, target, args.tree)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
