"""``leaves``: step time of ``adam_jax.adam`` relative to ``optax.adam`` on 1 and 64 leaves.

One jitted, donating step (update + ``optax.apply_updates``) of ``adam_jax.adam(1e-3)`` and of
``optax.adam(1e-3)`` on float32 trees of 1 x 4M, 64 x 64k and 64 x 1k elements; the two are
timed in the same rounds (interleaved), and ``ratio_vs_optax`` is the median over rounds of
our time over optax's time in that round (below 1: faster than optax). Issue 7 asks that this
ratio not get worse with the core rewrite (``benchmarks.compare_revisions`` measures two
checkouts of adam_jax this way).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import optax

import adam_jax
from benchmarks.harness import LR, Row, Runner, Settings, adam_step, copy_tree, interleaved
from benchmarks.models import params_and_grads

TREES = ((1, 4 * 1024 * 1024), (64, 64 * 1024), (64, 1024))
QUICK_TREES = ((1, 16 * 1024), (8, 1024))
REPEATS = 200
REFERENCE = "optax.adam"


def _variants() -> tuple[tuple[str, optax.GradientTransformation], ...]:
    return ((REFERENCE, optax.adam(LR)), ("adam_jax.adam", adam_jax.adam(LR)))


def measure(
    trees: Sequence[tuple[int, int]],
    repeats: int,
    variants: Callable[[], Sequence[tuple[str, optax.GradientTransformation]]] = _variants,
    ratio_key: str = "ratio_vs_optax",
) -> list[Row]:
    """Times ``variants`` (the first is the reference) interleaved on each tree; each row's
    ``ratio_key`` is the median over rounds of its time over the reference's."""
    rows = []
    for num_leaves, leaf_size in trees:
        params, grads = params_and_grads(num_leaves, leaf_size)
        runners = []
        for name, tx in variants():
            runners.append(Runner(name, adam_step(tx), copy_tree(params), grads, tx.init(params)))
        del params
        interleaved(runners, repeats)
        reference = runners[0]
        for runner in runners:
            ratio = statistics.median(
                ours / theirs for ours, theirs in zip(runner.times, reference.times, strict=True)
            )
            rows.append(
                {
                    "tree": f"{num_leaves} x {leaf_size}",
                    "num_leaves": num_leaves,
                    "leaf_size": leaf_size,
                    "variant": runner.name,
                    "median_ms": 1e3 * runner.median,
                    "min_ms": 1e3 * min(runner.times),
                    ratio_key: ratio,
                    "page_faults_per_step": statistics.median(runner.page_faults),
                    "repeats": len(runner.times),
                }
            )
            print(
                f"  {num_leaves:3d} x {leaf_size:8d} {runner.name:14s} "
                f"{1e3 * runner.median:8.3f} ms  x{ratio:.3f} {reference.name}  "
                f"{statistics.median(runner.page_faults):7.0f} page faults",
                flush=True,
            )
            runner.release()
    return rows


def run(settings: Settings) -> list[Row]:
    trees = QUICK_TREES if settings.quick else TREES
    return measure(trees, settings.repeats_or(REPEATS, quick=20))
