"""``compile``: tracing + lowering and XLA compilation of the jitted step, by number of leaves.

Leaves of 125 x 128 float32 (16k elements), 100, 1000 and 3000 of them (``--compile-leaves``),
on abstract inputs.
"""

from __future__ import annotations

import jax
import optax

import adam_jax
from adam_jax import flat
from benchmarks.harness import LR, Row, Settings, adam_step, time_compile
from benchmarks.models import abstract_flat_params, abstract_tree

LEAF_SHAPE = (125, 128)
QUICK_LEAF_COUNTS = (10, 100)


def measure(leaf_counts: tuple[int, ...], leaf_shape: tuple[int, ...] = LEAF_SHAPE) -> list[Row]:
    rows = []
    for num_leaves in leaf_counts:
        tree = abstract_tree(num_leaves, leaf_shape)
        variants = {
            "optax.adam": (optax.adam(LR), tree),
            "adam_jax.adam": (adam_jax.adam(LR), tree),
            "adam_jax.adam flat params": (adam_jax.adam(LR), abstract_flat_params(tree)),
            "flat(adam_jax.adam) tree params": (flat.flat(adam_jax.adam(LR)), tree),
        }
        for name, (tx, params) in variants.items():
            state = jax.eval_shape(tx.init, params)
            # adam_step returns a new function: nothing is reused from jax's tracing caches.
            traced, compiled = time_compile(adam_step(tx), (params, params, state))
            rows.append(
                {
                    "num_leaves": num_leaves,
                    "variant": name,
                    "trace_s": traced,
                    "compile_s": compiled,
                    "total_s": traced + compiled,
                }
            )
            print(
                f"  {num_leaves:5d} leaves {name:34s} trace {traced:7.2f} s  XLA {compiled:7.2f} s",
                flush=True,
            )
    return rows


def run(settings: Settings) -> list[Row]:
    return measure(QUICK_LEAF_COUNTS if settings.quick else settings.compile_leaves)
