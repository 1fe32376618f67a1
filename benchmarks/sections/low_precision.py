"""``low_precision``: step time of the low-precision wrappers against the unwrapped step.

One jitted, donating step (update + ``optax.apply_updates``) of ``adam_jax.adam(1e-3)`` on
bfloat16 params (its moments bfloat16 too), of the same wrapped in
``adam_jax.kahan_summation`` and in ``adam_jax.stochastic_rounding``, and of
``adam_jax.adam`` on float32 params for scale, timed in the same rounds (interleaved) on trees
of 1 x 4M and 64 x 64k elements. ``ratio_vs_plain`` is the median over rounds of the time over
the plain bfloat16 step's time in that round: the price of the compensation buffer (a read and
a write of 2 bytes per parameter) and of the random bits.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import adam_jax
from benchmarks.harness import LR, Row, Runner, Settings, adam_step, copy_tree, interleaved
from benchmarks.models import params_and_grads

TREES = ((1, 4 * 1024 * 1024), (64, 64 * 1024))
QUICK_TREES = ((1, 16 * 1024), (8, 1024))
REPEATS = 50
# name -> (optimizer, params dtype)
VARIANTS: dict[str, tuple[Callable[[], optax.GradientTransformation], jnp.dtype]] = {
    "bfloat16 plain": (lambda: adam_jax.adam(LR), jnp.dtype(jnp.bfloat16)),
    "bfloat16 kahan": (
        lambda: adam_jax.kahan_summation(adam_jax.adam(LR)),
        jnp.dtype(jnp.bfloat16),
    ),
    "bfloat16 stochastic": (
        lambda: adam_jax.stochastic_rounding(adam_jax.adam(LR), key=0),
        jnp.dtype(jnp.bfloat16),
    ),
    "float32": (lambda: adam_jax.adam(LR), jnp.dtype(jnp.float32)),
}


def measure(trees: tuple[tuple[int, int], ...], repeats: int) -> list[Row]:
    rows = []
    for num_leaves, leaf_size in trees:
        params, grads = params_and_grads(num_leaves, leaf_size)
        runners = []
        for name, (make, dtype) in VARIANTS.items():
            tx = make()
            typed_params = jax.tree.map(lambda x, dtype=dtype: x.astype(dtype), params)
            typed_grads = jax.tree.map(lambda x, dtype=dtype: x.astype(dtype), grads)
            runners.append(
                Runner(
                    name,
                    adam_step(tx),
                    copy_tree(typed_params),
                    typed_grads,
                    tx.init(typed_params),
                )
            )
        interleaved(runners, repeats)
        plain = runners[0]
        for runner in runners:
            ratio = statistics.median(a / b for a, b in zip(runner.times, plain.times, strict=True))
            rows.append(
                {
                    "tree": f"{num_leaves} x {leaf_size}",
                    "variant": runner.name,
                    "median_ms": 1e3 * runner.median,
                    "ratio_vs_plain": ratio,
                    "repeats": len(runner.times),
                }
            )
            print(
                f"  {rows[-1]['tree']:14s} {runner.name:20s} {rows[-1]['median_ms']:8.3f} ms  "
                f"x{ratio:.3f} plain bfloat16",
                flush=True,
            )
        for runner in runners:
            runner.release()
        del params, grads
    return rows


def run(settings: Settings) -> list[Row]:
    trees = QUICK_TREES if settings.quick else TREES
    return measure(trees, settings.repeats_or(REPEATS, quick=5))
