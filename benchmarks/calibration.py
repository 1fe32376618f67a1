"""The GPU time model (:mod:`benchmarks.time_model`) against every step time recorded on an
H100 and an H200 in ``benchmarks/results/``: each recorded row's program compiled anew for its
card (deviceless), predicted, and set beside the measured median.

    python -m benchmarks.calibration                  # the table (Markdown), docs/speed.md's
    python -m benchmarks.calibration --fit            # also fit the model's constants

A row whose program this module cannot build again (a whole train step, SOAP's settings other
than its plain cycle, the reference kernels of ``steps``, the Pallas kernel, the offload
section's memory rows) is listed with the reason. The programs are compiled with the
installed jax (0.10.2 here); the rows were measured with jax 0.11.2 on the lent machines, whose
programs may differ a little. jax is imported inside the functions: after
:func:`benchmarks.accelerators.enable`, which must come first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import accelerators

RESULTS = Path(__file__).resolve().parent / "results"
#: Recorded files and their card.
FILES = {"gpu_h100.json": "h100", "gpu.json": "h200"}
SECTIONS = ("leaf_cost", "eight_bit", "steps", "leaves", "variants", "low_precision", "billion")
#: Recorded sections whose programs are not an optimizer step on a tree of vectors.
OTHER_SECTIONS = ("train_step", "soap", "soap_steps", "soap_branches", "offload")
OTHER_REASON = (
    "a whole train step, SOAP's other settings (blocks, storages, staggered refreshes, branch "
    "experiments) or the offload section's memory rows (SOAP's and AdamW's cycles and the "
    "offload section's 98M transformer are modelled above)"
)


@dataclasses.dataclass
class Recorded:
    file: str
    card: str
    section: str
    tree: str
    variant: str
    measured_ms: float


def recorded_rows() -> list[Recorded]:
    rows = []
    for name, card in FILES.items():
        data = json.loads((RESULTS / name).read_text())
        for section in SECTIONS:
            for row in data.get(section, []):
                tree = row.get("tree") or f"1 x {row['num_params']}"
                rows.append(Recorded(name, card, section, tree, row["variant"], row["median_ms"]))
    return rows


def _builder(row: Recorded) -> tuple[Callable[[], Any], Any, str] | str:
    """(optimizer factory, params dtype, layout) of a row, or why it cannot be built."""
    import jax.numpy as jnp
    import optax

    import adam_jax
    from benchmarks.harness import LR
    from benchmarks.sections import eight_bit

    name = row.variant.removeprefix("adam_jax.")
    f32, bf16 = jnp.float32, jnp.bfloat16
    table: dict[str, tuple[Callable[[], Any], Any, str]] = {
        "optax.adam": (lambda: optax.adam(LR), f32, "tree"),
        "adam": (lambda: adam_jax.adam(LR), f32, "tree"),
        "adam flat params": (lambda: adam_jax.adam(LR), f32, "flat"),
        "flat(adam_jax.adam) tree params": (
            lambda: adam_jax.flat.flat(adam_jax.adam(LR)),
            f32,
            "tree",
        ),
        "adam bf16 moments": (
            lambda: adam_jax.adam(LR, mu_dtype=bf16, nu_dtype=bf16),
            f32,
            "tree",
        ),
        "adam 8-bit moments": (lambda: adam_jax.adam_8bit(LR), f32, "tree"),
        "adam_8bit": (lambda: adam_jax.adam_8bit(LR), f32, "tree"),
        "adam_8bit, in slices": (
            lambda: adam_jax.step_in_slices(adam_jax.adam_8bit(LR), eight_bit.SLICE_ELEMENTS),
            f32,
            "tree",
        ),
        "no-op, tree": (lambda: adam_jax.adam(LR), f32, "noop"),
        "no-op, flat params": (lambda: adam_jax.adam(LR), f32, "noop flat"),
        "bfloat16 plain": (lambda: adam_jax.adam(LR), bf16, "tree"),
        "bfloat16 kahan": (lambda: adam_jax.kahan_summation(adam_jax.adam(LR)), bf16, "tree"),
        "bfloat16 stochastic": (
            lambda: adam_jax.stochastic_rounding(adam_jax.adam(LR), key=0),
            bf16,
            "tree",
        ),
        "float32": (lambda: adam_jax.adam(LR), f32, "tree"),
    }
    if name in table:
        return table[name]
    if row.section == "variants" and name in adam_jax.registry.names():
        info = adam_jax.registry.get(name)
        return (lambda: info.alias(LR)), f32, "tree"
    if name in ("stream (p + 1)", "floor"):
        return "a reference kernel of the section, not an optimizer step"
    if "fused kernel" in name:
        # Built with kernel="auto" (the same Pallas kernel on a GPU), the model times its
        # Triton call by its bytes: 0.29 and 0.57 ms against 0.68 and 1.42 measured (H100).
        return "the Pallas kernel, slower than its bytes at the fitted bandwidth (0.4x)"
    return "a storage of the section's own"


def _program(row: Recorded) -> Any:
    """The compiled program of a row (a :class:`benchmarks.hlo_program.Program`), or why it
    cannot be built (a string)."""
    import jax
    from jax.sharding import SingleDeviceSharding

    from benchmarks.harness import adam_step
    from benchmarks.hlo_program import read_program
    from benchmarks.models import abstract_flat_params
    from benchmarks.sections.leaf_cost import noop_step

    built = _builder(row)
    if isinstance(built, str):
        return built
    make, dtype, layout = built
    match = re.fullmatch(r"(\d+) x (\d+)", row.tree)
    if match is None:
        return "not a tree of vectors"
    count, size = int(match.group(1)), int(match.group(2))
    params: Any = {f"p{i:04d}": jax.ShapeDtypeStruct((size,), dtype) for i in range(count)}
    if "flat" in layout:
        params = abstract_flat_params(params)
    tx = make()
    state = jax.eval_shape(tx.init, params)
    device = SingleDeviceSharding(accelerators.devices(accelerators.TARGETS[row.card])[0])
    args = tuple(accelerators.placed(t, device) for t in (params, params, state))
    step = noop_step if layout.startswith("noop") else adam_step(tx)
    compiled = accelerators.compile_for(step, args, (0, 2), keep_unused=True)
    return read_program(compiled.text)


#: Recorded SOAP rows that a cycle of the section's is built again for: (file, section, width).
SOAP_ROWS = (
    ("gpu.json", "soap", 64),
    ("gpu.json", "soap", 256),
    ("gpu_h100.json", "soap_branches", 64),
)


def _soap_programs() -> list[tuple[Recorded, Any, list[float] | str]]:
    """The recorded SOAP rows' programs: a ``FREQUENCY``-step cycle of ``adam_jax.soap`` (and
    of ``adam_jax.adamw``) on the section's transformer-like tree, each with the branch weights
    of a cycle (one refresh, no first step)."""
    import jax
    from jax.sharding import SingleDeviceSharding

    import adam_jax
    from benchmarks.harness import LR
    from benchmarks.hlo_program import read_program
    from benchmarks.models import transformer_params
    from benchmarks.sections import soap

    found = []
    for name, section, width in SOAP_ROWS:
        card = FILES[name]
        rows = json.loads((RESULTS / name).read_text()).get(section, [])
        row = next((r for r in rows if r.get("tree") == f"transformer-like, d = {width}"), None)
        if row is None or "soap_ms_per_step" not in row:
            continue
        params = jax.eval_shape(
            lambda width=width: transformer_params(
                jax.random.key(0), layers=soap.LAYERS, d=width, ff=4 * width, seq=64
            )
        )
        device = SingleDeviceSharding(accelerators.devices(accelerators.TARGETS[card])[0])
        for variant, tx in (
            ("adamw_ms_per_step", adam_jax.adamw(LR)),
            ("soap_ms_per_step", adam_jax.soap(LR, precondition_frequency=soap.FREQUENCY)),
        ):
            state = jax.eval_shape(tx.init, params)
            args = tuple(accelerators.placed(t, device) for t in (params, params, state))
            compiled = accelerators.compile_for(soap.cycle(tx), args, (0, 2))
            program = read_program(compiled.text)
            recorded = Recorded(
                name,
                card,
                section,
                f"transformer-like, d = {width}",
                f"{variant.removesuffix('_ms_per_step')}, cycle of {soap.FREQUENCY}",
                row[variant] * soap.FREQUENCY,
            )
            found.append((recorded, program, _cycle_weights(program)))
    return found


#: The offload section's rows on the 98M transformer that are built again: tree -> train step.
OFFLOAD_TREES = {"transformer, 98M": False, "transformer, 98M, train step": True}


def _offload_programs() -> list[tuple[Recorded, Any, list[float] | str]]:
    """The recorded rows of the offload section's 98M transformer: each setting's optimizer
    step, or float32 AdamW's whole train step, on the device and with its state offloaded."""
    import jax
    import jax.numpy as jnp

    import adam_jax
    from benchmarks.hlo_program import read_program
    from benchmarks.models import transformer_loss
    from benchmarks.offload_order import step_program, transformer_tree
    from benchmarks.sections import offload

    params = transformer_tree()
    tokens = jax.ShapeDtypeStruct(offload.GPU_BATCH, jnp.int32)
    ordered = {
        "leaf_order": adam_jax.gradient_order(transformer_loss, params, tokens),
        "prefetch": offload.GRADIENT_ORDER_PREFETCH,
    }
    found = []
    for name, card in FILES.items():
        for row in json.loads((RESULTS / name).read_text()).get("offload", []):
            if row.get("tree") not in OFFLOAD_TREES or "offloaded_median_ms" not in row:
                continue
            # "<setting>[, gradient order, prefetch=k]": the train step's rows
            setting, _, in_order = row["setting"].partition(", gradient order")
            make = offload.SETTINGS[setting]
            options = ordered if in_order else {}
            for offloaded, measured in (
                (False, row["device_median_ms"]),
                (True, row["offloaded_median_ms"]),
            ):
                # Measured before small arrays stayed on the device: every array offloaded.
                tx = (
                    adam_jax.offload_state(make(), min_offloaded_size=0, **options)
                    if offloaded
                    else make()
                )
                compiled = step_program(
                    tx, card, offloaded=offloaded, train=OFFLOAD_TREES[row["tree"]], params=params
                )
                where = "offloaded" if offloaded else "on the device"
                recorded = Recorded(
                    name, card, "offload", row["tree"], f"{row['setting']}, {where}", measured
                )
                found.append((recorded, read_program(compiled.text), "cheapest"))
    return found


def _cycle_weights(program: Any) -> list[float] | str:
    """The weights of SOAP's branches over a cycle of ``FREQUENCY`` steps: the first step's
    (eigendecompositions) never, the refresh's (Cholesky QR) once, the plain step's the rest."""
    from benchmarks.sections import soap

    # The step's switch of phases: the conditional of three branches (Cholesky QR's branch of
    # further passes sits inside the refresh's and takes its cheapest side, two passes).
    switches = [c for c in program.conditionals if len(c.members) == 3]
    if not switches:
        return "cheapest"
    (branching,) = switches
    weights = []
    for branch in branching.branches:
        calls = " ".join(branch["custom_calls"])
        if "syevd" in calls:
            weights.append(0.0)
        elif "potrf" in calls or "geqrf" in calls:
            weights.append(1 / soap.FREQUENCY)
        else:
            weights.append(1 - 1 / soap.FREQUENCY)
    return weights


def table(fit: bool) -> str:
    from benchmarks import time_model

    built: list[tuple[Recorded, Any, list[float] | str]] = []
    skipped: list[tuple[Recorded, str]] = []
    for row in recorded_rows():
        program = _program(row)
        if isinstance(program, str):
            skipped.append((row, program))
        else:
            built.append((row, program, "cheapest"))
    built += _soap_programs() + _offload_programs()
    constants = time_model.CALIBRATED
    if fit:
        constants = time_model.fit(
            [(p, r.card, r.measured_ms / 1e3, w) for r, p, w in built],
            {
                "host_fixed": [40e-6, 60e-6, 80e-6, 100e-6],
                "host_per_argument": [2e-6, 3e-6, 4e-6, 5e-6],
                "host_per_argument_squared": [0.5e-9, 1e-9, 1.5e-9],
                "launch": [1e-6, 2e-6, 4e-6],
                "bandwidth_fraction": [0.6, 0.7, 0.8, 0.9],
                "solver_call": [20e-6, 50e-6, 100e-6, 200e-6],
                "sync": [10e-6, 20e-6, 40e-6],
            },
        )
        print(constants)
    lines = [
        "| card | section | tree | variant | kernels | measured ms | model ms | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    errors = []
    for row, program, weights in built:
        predicted = 1e3 * time_model.predict(program, row.card, constants, weights)
        error = predicted / row.measured_ms - 1
        errors.append(abs(math.log(predicted / row.measured_ms)))
        lines.append(
            f"| {row.card} | {row.section} | {row.tree} | {row.variant} | "
            f"{program.kernel_count} | {row.measured_ms:.4g} | {predicted:.4g} | {error:+.0%} |"
        )
    errors.sort()
    lines.append("")
    lines.append(
        f"{len(built)} rows modelled: median error {math.exp(errors[len(errors) // 2]) - 1:.0%}, "
        f"90th percentile {math.exp(errors[int(0.9 * (len(errors) - 1))]) - 1:.0%} (as a ratio)."
    )
    lines.append("")
    lines.append("Not modelled:")
    reasons: dict[str, list[str]] = {}
    for row, reason in skipped:
        reasons.setdefault(reason, []).append(f"{row.card} {row.section} {row.variant}")
    for name, card in FILES.items():
        data = json.loads((RESULTS / name).read_text())
        for section in OTHER_SECTIONS:
            rows = [r for r in data.get(section, []) if r.get("tree") not in OFFLOAD_TREES]
            if rows:
                reasons.setdefault(OTHER_REASON, [])
                reasons[OTHER_REASON] += [f"{card} {section}"] * len(rows)
    for reason, which in reasons.items():
        lines.append(f"- {reason}: {len(which)} rows ({', '.join(sorted(set(which))[:6])}...)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibration")
    parser.add_argument("--fit", action="store_true", help="fit the constants, then tabulate")
    args = parser.parse_args()
    accelerators.enable_or_exit(parser)
    print(table(args.fit))


if __name__ == "__main__":
    main()
