"""Checks of the fused 8-bit Adam kernel on a GPU against the XLA path (issue 51).

For a few leaves (one vector of 16M, a ragged vector of 1M, a matrix of column blocks, a matrix
of row blocks) the state is brought to a few steps of random gradients of varied sizes by the
XLA path; then one step from that state by the XLA path and by the kernel
(``BlockwiseQuantized(kernel="pallas")``) is compared: the largest code difference of each
moment and how many codes differ, the largest relative difference of the block scales, and the
largest difference of the updates in ulps. Then ``DRIFT_STEPS`` steps of each from the start,
apart, and of float32 AdamW: how far the two 8-bit paths' params drift apart, how far each
path moved them, its largest update over the learning rate and its elements whose second
moment decodes to zero where the first does not (zero points), which tell which path left
the float32 trajectory. Also whether the compiled step holds the kernel's Triton call.
Expected: codes within one step (Triton may contract a multiply and an add into an FMA, and
divides approximately, where XLA does not). The gradients are hard on purpose (their scale
changes a thousandfold between steps, their entries heavy-tailed): an element whose second
moment rounds to zero takes, at its next small gradient, an update of its first moment over
that gradient's share alone, on either path, so which elements do is decided by rounding.

On a GPU it then times the kernel's step on one 16M leaf, interleaved with float32 Adam and the
XLA 8-bit step. (A sweep of the kernel's tilings on an H100, 2026-11-26,
``benchmarks/results/gpu_checks_h100.json``, found none faster than the XLA path.)

    python -m benchmarks.gpu_checks --out benchmarks/results/gpu_checks.json

Off a GPU it runs the kernel interpreted, on small leaves and the 1000 x 64 one (about a
minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax
from adam_jax.quantization import BlockwiseQuantized, dequantize_blockwise
from benchmarks.harness import LR, Runner, adam_step, copy_tree, interleaved
from benchmarks.models import params_and_grads

GPU_SHAPES = ((16_000_000,), (1_000_000,), (4096, 1024), (1000, 64))
# A ragged vector, a matrix of row blocks, and the leaf whose paths drifted apart on an H100.
CPU_SHAPES = ((256 * 300 + 10,), (64, 64), (1000, 64))
WARM_STEPS = 3
DRIFT_STEPS = 20
RATE = 1e-3
TRITON_CALL = "__gpu$xla.gpu.triton"
TUNE_SIZE = 16_000_000
TUNE_REPEATS = 30


def _tx(kernel: str) -> optax.GradientTransformation:
    storages = {
        "mu_dtype": BlockwiseQuantized(signed=True, kernel=kernel),
        "nu_dtype": BlockwiseQuantized(signed=False, kernel=kernel),
    }
    return adam_jax.adamw(RATE, weight_decay=0.01, **storages)


def _grad(shape: tuple[int, ...], i: int) -> jax.Array:
    g = jax.random.normal(jax.random.key(100 + i), shape)
    return g * (10.0 ** -(i % 4)) * jnp.exp(jax.random.normal(jax.random.key(200 + i), shape))


def _step_fn(tx: optax.GradientTransformation) -> Any:
    def step(p: jax.Array, s: Any, g: jax.Array) -> tuple[jax.Array, Any, jax.Array]:
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, u

    return jax.jit(step)


def _ulps(a: jax.Array, b: jax.Array) -> int:
    ia = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
    ib = np.asarray(b, np.float32).view(np.int32).astype(np.int64)
    # Order the bit patterns of negative floats like their values.
    ia = np.where(ia < 0, np.int64(-(2**31)) - ia, ia)
    ib = np.where(ib < 0, np.int64(-(2**31)) - ib, ib)
    return int(np.max(np.abs(ia - ib))) if ia.size else 0


def check_shape(shape: tuple[int, ...], kernel: str) -> dict[str, Any]:
    xla_tx, fused_tx = _tx("xla"), _tx(kernel)
    xla_step, fused_step = _step_fn(xla_tx), _step_fn(fused_tx)
    params = jax.random.normal(jax.random.key(0), shape)
    lowered = jax.jit(lambda p, s, g: fused_tx.update(g, s, p)).lower(
        params, fused_tx.init(params), params
    )
    row: dict[str, Any] = {"shape": list(shape), "kernel": kernel}
    row["triton_call_in_program"] = TRITON_CALL in lowered.as_text()
    jaxpr = jax.make_jaxpr(lambda p, s, g: fused_tx.update(g, s, p))
    row["kernel_calls"] = str(jaxpr(params, fused_tx.init(params), params)).count("pallas_call")
    p, s = params, xla_tx.init(params)
    for i in range(WARM_STEPS):
        p, s, _ = xla_step(p, s, _grad(shape, i))
    g = _grad(shape, WARM_STEPS)
    start = time.perf_counter()
    p_x, s_x, u_x = jax.block_until_ready(xla_step(p, s, g))
    p_k, s_k, u_k = jax.block_until_ready(fused_step(p, s, g))
    row["one_step_seconds_both"] = time.perf_counter() - start
    mx, mk = s_x[0].mu, s_k[0].mu
    nx, nk = s_x[0].nu, s_k[0].nu
    for name, a, b in (("mu", mx, mk), ("nu", nx, nk)):
        codes_a = np.asarray(a.codes, np.int32)
        codes_b = np.asarray(b.codes, np.int32)
        row[f"{name}_max_code_difference"] = int(np.max(np.abs(codes_a - codes_b)))
        row[f"{name}_codes_differing"] = int(np.sum(codes_a != codes_b))
        scale_a, scale_b = np.asarray(a.absmax), np.asarray(b.absmax)
        denominator = np.where(scale_a == 0, 1.0, np.abs(scale_a))
        row[f"{name}_scales_max_relative_difference"] = float(
            np.max(np.abs(scale_a - scale_b) / denominator)
        )
        row[f"{name}_scales_differing"] = int(np.sum(scale_a != scale_b))
    row["update_max_ulps"] = _ulps(u_x, u_k)
    row["updates_differing"] = int(np.sum(np.asarray(u_x) != np.asarray(u_k)))
    row["params_max_ulps"] = _ulps(p_x, p_k)
    row["elements"] = int(np.prod(shape))
    row.update(_drift(shape, params, xla_step, fused_step, xla_tx, fused_tx))
    return row


def _zero_points(state: Any) -> int:
    """Elements whose second moment decodes to zero where the first does not: the next update
    of such an element is its first moment over the new gradient's share alone (the 8-bit
    map's zero point, which a second moment below about 1e-7 of its block's largest rounds to)."""
    mu = np.asarray(dequantize_blockwise(state[0].mu, signed=True))
    nu = np.asarray(dequantize_blockwise(state[0].nu, signed=False))
    return int(np.sum((nu == 0) & (mu != 0)))


def _drift(
    shape: tuple[int, ...],
    params: jax.Array,
    xla_step: Any,
    fused_step: Any,
    xla_tx: optax.GradientTransformation,
    fused_tx: optax.GradientTransformation,
) -> dict[str, Any]:
    """``DRIFT_STEPS`` steps of each path from the same start, apart, and of float32 AdamW:
    how far the two 8-bit paths' params end apart, how far each path moved them, its largest
    update over the learning rate (float32 Adam's stays near 1) and its zero points at the
    end, so that a drift tells which path left the float32 trajectory."""
    f32_tx = adam_jax.adamw(RATE, weight_decay=0.01)
    runs = {"xla": (xla_step, xla_tx), "kernel": (fused_step, fused_tx)}
    runs["float32"] = (_step_fn(f32_tx), f32_tx)
    ends, row = {}, {}
    for name, (step, tx) in runs.items():
        p, s, largest = params, tx.init(params), 0.0
        for i in range(DRIFT_STEPS):
            p, s, u = step(p, s, _grad(shape, i))
            largest = max(largest, float(jnp.max(jnp.abs(u))) / RATE)
        ends[name] = np.asarray(p)
        row[f"{name}_moved_max_abs"] = float(np.max(np.abs(ends[name] - np.asarray(params))))
        row[f"{name}_largest_update_over_lr"] = largest
        if name != "float32":
            row[f"{name}_zero_points_at_end"] = _zero_points(s)
    apart = float(np.max(np.abs(ends["xla"] - ends["kernel"])))
    row[f"drift_after_{DRIFT_STEPS}_steps_max_abs"] = apart
    row[f"drift_after_{DRIFT_STEPS}_steps_over_max_move"] = apart / max(
        row["xla_moved_max_abs"], 1e-30
    )
    return row


def tune(kernel: str = "pallas") -> list[dict[str, Any]]:
    """The kernel's step on one 16M leaf against float32 Adam and the XLA 8-bit step, in the
    same rounds (medians in ms, and over float32's)."""
    params, grads = params_and_grads(1, TUNE_SIZE)
    runners = []
    for name, tx in (
        ("adam_jax.adam", adam_jax.adam(LR)),
        ("adam_8bit xla", adam_jax.adam_8bit(LR)),
    ):
        runners.append(Runner(name, adam_step(tx), copy_tree(params), grads, tx.init(params)))
    storages = [BlockwiseQuantized(signed=signed, kernel=kernel) for signed in (True, False)]
    fused_tx = adam_jax.adam(LR, mu_dtype=storages[0], nu_dtype=storages[1])
    step = adam_step(fused_tx)
    runners.append(Runner("kernel", step, copy_tree(params), grads, fused_tx.init(params)))
    interleaved(runners, TUNE_REPEATS)
    reference = runners[0]
    rows = []
    for runner in runners:
        ratios = sorted(a / b for a, b in zip(runner.times, reference.times, strict=True))
        row = {
            "variant": runner.name,
            "median_ms": 1e3 * runner.median,
            "min_ms": 1e3 * min(runner.times),
            "ratio_vs_float32": ratios[len(ratios) // 2],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        runner.release()
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--no-tune", action="store_true", help="skip timing the kernel")
    args = parser.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    kernel = "pallas" if on_gpu else "interpret"
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    device = jax.devices()[0]
    print(f"{device.platform}: {device.device_kind}, jax {jax.__version__}", flush=True)
    rows = []
    for shape in shapes:
        try:
            row = check_shape(shape, kernel)
        except Exception as error:  # report every shape, whatever one of them raises
            row = {"shape": list(shape), "kernel": kernel, "error": repr(error)[:2000]}
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        rows.append(row)
    tuning: list[dict[str, Any]] = []
    if on_gpu and not args.no_tune:
        try:
            tuning = tune()
        except Exception as error:
            tuning = [{"error": repr(error)[:2000]}]
            traceback.print_exc()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        info = {"device": f"{device.platform}: {device.device_kind}", "jax": jax.__version__}
        result = {"machine": info, "rows": rows, "tuning": tuning}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
