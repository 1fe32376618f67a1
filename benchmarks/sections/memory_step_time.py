"""``memory_step_time``: step time of each memory setting against the 8-bit moments' step.

The settings of :mod:`benchmarks.sections.memory` on the same transformer-like tree (16 blocks,
d = 64, 4 heads), with real arrays: one jitted, donating step (update + apply) per setting, all
timed in the same rounds (interleaved). ``ratio_vs_8bit`` is the median over rounds of a
setting's time over the ``8-bit moments`` step's in that round.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp

from benchmarks.harness import Row, Runner, Settings, adam_step, copy_tree, interleaved
from benchmarks.models import transformer_params
from benchmarks.sections.memory import SETTINGS

REFERENCE = "8-bit moments"
REPEATS = 30


def measure(layers: int, repeats: int, names: tuple[str, ...] = tuple(SETTINGS)) -> list[Row]:
    """Times the settings ``names`` (``REFERENCE`` among them) on a tree of ``layers`` blocks."""
    base = transformer_params(jax.random.key(0), layers=layers)
    n = sum(x.size for x in jax.tree.leaves(base))
    runners = []
    for name in names:
        dtype, make = SETTINGS[name]
        params = jax.tree.map(lambda x, d=dtype: x.astype(d), base)
        grads = jax.tree.map(lambda x: jnp.cos(x) * 1e-2, params)
        tx = make()
        runners.append(Runner(name, adam_step(tx), copy_tree(params), grads, tx.init(params)))
    interleaved(runners, repeats)
    reference = next(r for r in runners if r.name == REFERENCE)
    rows = []
    for runner in runners:
        ratio = statistics.median(
            ours / theirs for ours, theirs in zip(runner.times, reference.times, strict=True)
        )
        rows.append(
            {
                "tree": "transformer-like",
                "num_params": n,
                "setting": runner.name,
                "median_ms": 1e3 * runner.median,
                "ratio_vs_8bit": ratio,
                "repeats": len(runner.times),
            }
        )
        print(f"  {runner.name:40s} {1e3 * runner.median:8.3f} ms  x{ratio:.3f}", flush=True)
    for runner in runners:
        runner.release()
    return rows


def run(settings: Settings) -> list[Row]:
    return measure(2 if settings.quick else 16, settings.repeats_or(REPEATS, quick=3))
