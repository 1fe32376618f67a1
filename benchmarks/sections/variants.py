"""``variants``: step time of every variant of the modern Adam family against optax's namesake
and against ``adam_jax.adamw``.

For each variant, one jitted, donating step (update + ``optax.apply_updates``) of adam_jax's
alias, of ``adam_jax.adamw`` and, where optax has the optimizer, of optax's, timed in the same
rounds (interleaved) on float32 trees of 1 x 4M and 64 x 64k elements. ``ratio_vs_optax`` and
``ratio_vs_adamw`` are medians over rounds of the variant's time over the other's time in that
round. Issue 13 asks that ``ratio_vs_optax`` stay at most 1.05.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import optax

import adam_jax
from benchmarks.harness import LR, Row, Runner, Settings, adam_step, copy_tree, interleaved
from benchmarks.models import params_and_grads

TREES = ((1, 4 * 1024 * 1024), (64, 64 * 1024))
QUICK_TREES = ((1, 16 * 1024), (8, 1024))
REPEATS = 100
Factory = Callable[[], optax.GradientTransformation]


def _factories(info: adam_jax.registry.OptimizerInfo) -> tuple[Factory, Factory | None]:
    namesake = info.optax_namesake()
    return (lambda: info.alias(LR)), (None if namesake is None else lambda: namesake(LR))


# name -> (adam_jax's alias, optax's namesake or None), at the same arguments: every variant of
# the registry.
VARIANTS: dict[str, tuple[Factory, Factory | None]] = {
    info.name: _factories(info) for info in adam_jax.registry.OPTIMIZERS if info.group == "variant"
}


def _ratio(runner: Runner, other: Runner | None) -> float | None:
    if other is None:
        return None
    return statistics.median(a / b for a, b in zip(runner.times, other.times, strict=True))


def measure(trees: tuple[tuple[int, int], ...], repeats: int) -> list[Row]:
    rows = []
    for num_leaves, leaf_size in trees:
        params, grads = params_and_grads(num_leaves, leaf_size)
        for name, (ours, theirs) in VARIANTS.items():
            candidates = {
                f"adam_jax.{name}": ours(),
                "adam_jax.adamw": adam_jax.adamw(LR),
                **({f"optax.{name}": theirs()} if theirs is not None else {}),
            }
            runners = {
                label: Runner(label, adam_step(tx), copy_tree(params), grads, tx.init(params))
                for label, tx in candidates.items()
            }
            interleaved(list(runners.values()), repeats)
            variant = runners[f"adam_jax.{name}"]
            optax_runner = runners.get(f"optax.{name}")
            row = {
                "tree": f"{num_leaves} x {leaf_size}",
                "variant": name,
                "median_ms": 1e3 * variant.median,
                "adamw_median_ms": 1e3 * runners["adam_jax.adamw"].median,
                "optax_median_ms": None if optax_runner is None else 1e3 * optax_runner.median,
                "ratio_vs_adamw": _ratio(variant, runners["adam_jax.adamw"]),
                "ratio_vs_optax": _ratio(variant, optax_runner),
                "repeats": len(variant.times),
            }
            rows.append(row)
            versus_optax = (
                "" if row["ratio_vs_optax"] is None else f"  x{row['ratio_vs_optax']:.3f} optax"
            )
            print(
                f"  {row['tree']:14s} {name:20s} {row['median_ms']:8.3f} ms  "
                f"x{row['ratio_vs_adamw']:.3f} adamw{versus_optax}",
                flush=True,
            )
            for runner in runners.values():
                runner.release()
        del params, grads
    return rows


def run(settings: Settings) -> list[Row]:
    trees = QUICK_TREES if settings.quick else TREES
    return measure(trees, settings.repeats_or(REPEATS, quick=5))
