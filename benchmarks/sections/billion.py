"""``billion`` (GPU): one Adam step on a single float32 leaf of 1B elements (28 GB of traffic).

``optax.adam`` runs beside ``adam_jax.adam`` only where the device has memory for a second
copy of params and moments (an H200, not an H100).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import adam_jax
from benchmarks.harness import LR, Row, Runner, Settings, adam_step, interleaved
from benchmarks.sections.steps import BYTES_PER_PARAM

SIZE = 1_000_000_000
QUICK_SIZE = 1_000_000
REPEATS = 5


def free_device_bytes() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)


def measure(repeats: int, size: int) -> list[Row]:
    params = {"w": jnp.zeros((size,), jnp.float32)}
    grads = {"w": jnp.full((size,), 1e-3, jnp.float32)}
    tx = adam_jax.adam(LR)
    runners = [Runner("adam_jax.adam", adam_step(tx), params, grads, tx.init(params))]
    if free_device_bytes() > 1.1 * 4 * 4 * size:  # p, g, m, v of a second optimizer
        ox = optax.adam(LR)
        optax_params = {"w": jnp.copy(params["w"])}
        runners.append(
            Runner("optax.adam", adam_step(ox), optax_params, grads, ox.init(optax_params))
        )
    interleaved(runners, repeats)
    rows = []
    for runner in runners:
        gb_per_s = BYTES_PER_PARAM * size / runner.median / 1e9
        rows.append(
            {
                "num_params": size,
                "variant": runner.name,
                "median_ms": 1e3 * runner.median,
                "gb_per_s": gb_per_s,
                "repeats": len(runner.times),
            }
        )
        print(
            f"  {size} params {runner.name:20s} {1e3 * runner.median:8.2f} ms {gb_per_s:7.1f} GB/s",
            flush=True,
        )
        runner.release()
    return rows


def run(settings: Settings) -> list[Row]:
    return measure(settings.repeats_or(REPEATS), QUICK_SIZE if settings.quick else SIZE)
