"""8-bit and 4-bit AdamW on the GPU against the same steps on the CPU of the same machine.

The GPU steps a leaf of at least ``TWO_PASSES_MIN_SIZE`` elements in two passes, the CPU in
one; both read the same codes and scales and the same gradients. After ``STEPS`` steps from the
same params, per optimizer and leaf: how many codes differ and by how many steps at most (4-bit
codes unpacked from their bytes), the largest relative difference of the scales, and the
largest difference of the params in units of the learning rate. Expected: codes within one
step where the GPU contracts a multiply and an add, or rounds a division, as the CPU does not
(issue 65). Its first run (an H200, jax 0.11.2, 2026-11-28: ``benchmarks/results/
gpu_codes_h200.json``) found every signed code 255 on three of the five shapes, which
``dynamic_map.encode`` then fixed (``benchmarks/results/gpu_h200_codes_diagnosis.log``).

    python -m benchmarks.gpu_codes --out benchmarks/results/gpu_codes_h200.json

Where there is no GPU it compares the CPU with itself (a smoke test: everything equal).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import adam_jax
from benchmarks.harness import adam_step, machine_info

LR = 1e-3
STEPS = 5
#: GPT-2's embedding and MLP shapes (two passes on a GPU), an odd last axis, a ragged vector,
#: and one below the two-pass size.
SHAPES = ((50257, 768), (768, 3072), (1001, 1001), (600_001,), (256, 256))


def optimizers() -> dict[str, optax.GradientTransformation]:
    return {
        "adamw_8bit": adam_jax.adamw_8bit(LR),
        "4-bit moments": adam_jax.adamw(LR, **adam_jax.four_bit_moments()),
    }


def _inputs(shape: tuple[int, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    params = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    # Gradients whose scale changes between steps, as a training run's do.
    grads = [
        (10.0 ** -(i % 3) * rng.standard_normal(shape)).astype(np.float32) for i in range(STEPS)
    ]
    return params, grads


def stepped(
    tx: optax.GradientTransformation, params: np.ndarray, grads: list[np.ndarray], device: Any
) -> tuple[np.ndarray, Any]:
    """``STEPS`` jitted steps on ``device``: the params and the state, on the host."""
    step = jax.jit(adam_step(tx))
    p = jax.device_put(params, device)
    s = jax.jit(tx.init)(p)
    for g in grads:
        p, s = step(p, jax.device_put(g, device), s)
    return np.asarray(p), jax.tree.map(np.asarray, s)


def _code_steps(a: np.ndarray, b: np.ndarray, packed: bool) -> np.ndarray:
    if packed:  # two 4-bit codes a byte
        a = np.stack([a & 15, a >> 4])
        b = np.stack([b & 15, b >> 4])
    return np.abs(a.astype(np.int32) - b.astype(np.int32))


def compare(name: str, gpu: tuple[np.ndarray, Any], cpu: tuple[np.ndarray, Any]) -> dict[str, Any]:
    (gpu_params, gpu_state), (cpu_params, cpu_state) = gpu, cpu
    codes, scales = [], []
    for a, b in zip(jax.tree.leaves(gpu_state), jax.tree.leaves(cpu_state), strict=True):
        if np.issubdtype(a.dtype, np.integer) and a.size > 1:
            steps = _code_steps(a, b, packed=name.startswith("4-bit") and a.dtype == np.uint8)
            codes.append(
                {
                    "differing": int((steps > 0).sum()),
                    "size": int(steps.size),
                    "most_steps": int(steps.max()),
                }
            )
        elif np.issubdtype(a.dtype, np.floating) and a.size > 1:
            rel = np.abs(a - b) / np.maximum(np.abs(b), np.finfo(np.float32).tiny)
            scales.append(float(rel.max()))
    return {
        "codes": codes,
        "scales_largest_relative_difference": max(scales, default=0.0),
        "params_largest_difference_in_lr": float(np.abs(gpu_params - cpu_params).max() / LR),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_codes")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device, cpu = jax.devices()[0], jax.devices("cpu")[0]
    report: dict[str, Any] = {"machine": machine_info(), "steps": STEPS, "rows": []}
    for shape in SHAPES:
        params, grads = _inputs(shape)
        for name, tx in optimizers().items():
            row = {"shape": list(shape), "optimizer": name}
            row |= compare(
                name, stepped(tx, params, grads, device), stepped(tx, params, grads, cpu)
            )
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
