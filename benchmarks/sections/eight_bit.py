"""``eight_bit``: step time of 8-bit moments relative to float32 moments.

One jitted, donating step (update + ``optax.apply_updates``) of ``adam_jax.adam(1e-3)`` and of
``adam_jax.adam_8bit(1e-3)`` on one float32 leaf of 4M elements, timed in the same rounds
(interleaved); ``ratio_vs_float32`` is the median over rounds of the 8-bit time over the
float32 time in that round (issue 8 targets at most 3 on CPU, 1.2 on GPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import optax

import adam_jax
from benchmarks.harness import LR, Row, Settings
from benchmarks.sections import leaves

TREES = ((1, 4 * 1024 * 1024),)
QUICK_TREES = ((1, 64 * 1024),)
REPEATS = 40


def _variants() -> Sequence[tuple[str, optax.GradientTransformation]]:
    return (("adam_jax.adam", adam_jax.adam(LR)), ("adam_jax.adam_8bit", adam_jax.adam_8bit(LR)))


def run(settings: Settings) -> list[Row]:
    trees = QUICK_TREES if settings.quick else TREES
    return leaves.measure(
        trees, settings.repeats_or(REPEATS, quick=5), _variants, ratio_key="ratio_vs_float32"
    )
