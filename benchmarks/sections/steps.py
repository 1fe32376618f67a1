"""``steps``: step time and achieved GB/s of one Adam step, 16M float32 parameters.

Trees of 1 x 16M, 16 x 1M, 256 x 62.5k and 1000 x 16k elements; variants: ``optax.adam``,
``adam_jax.adam`` on the tree, ``adam_jax.adam`` on flat params (``adam_jax.flat``; the
gradient arrives flat, as ``jax.grad`` w.r.t. a ``FlatParams`` returns it),
``adam_jax.flat.flat(adam)`` on the tree (concatenation inside the update), the bfloat16 /
8-bit moment options on the 1-leaf tree (on a GPU also the fused 8-bit kernel), and two
references: a "floor" kernel that streams the same seven arrays as Adam (reads p, g, m, v;
writes p, m, v) with no Adam math, and ``p + 1`` on one buffer, the machine's streaming
bandwidth. GB/s counts the nominal 28 bytes per parameter.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import adam_jax
from adam_jax import flat
from benchmarks.harness import LR, Row, Runner, Settings, adam_step, copy_tree, interleaved
from benchmarks.models import params_and_grads
from benchmarks.sections import eight_bit

BYTES_PER_PARAM = 28  # read p, g, m, v; write p, m, v (float32)
STREAM_BYTES_PER_PARAM = 8  # read p, write p
STREAM = "stream (p + 1)"
FLOOR = "floor"
TREES = ((1, 16_000_000), (16, 1_000_000), (256, 62_500), (1000, 16_000))
QUICK_TREES = ((1, 160_000), (100, 1_600))
REPEATS = 15


def floor_step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
    """Streams the same 7 arrays as Adam (read p, g, m, v; write p, m, v), no Adam math."""
    m, v = state
    return (
        jax.tree.map(lambda p, g: p + g, params, grads),
        (jax.tree.map(lambda a, g: a + g, m, grads), jax.tree.map(lambda a, g: a + g, v, grads)),
    )


def stream_step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
    """p + 1: one read and one write per element, the machine's streaming bandwidth."""
    del grads
    return jax.tree.map(lambda p: p + 1.0, params), state


def optimizer_runner(
    name: str, tx: optax.GradientTransformation, params: Any, grads: Any
) -> Runner:
    params = copy_tree(params)
    return Runner(name, adam_step(tx), params, grads, tx.init(params))


def tree_runners(num_leaves: int, leaf_size: int) -> list[Runner]:
    """The variants of one tree; the stream and floor references first."""
    params, grads = params_and_grads(num_leaves, leaf_size)
    zeros = jax.tree.map(jnp.zeros_like, params)
    runners = [
        Runner(STREAM, stream_step, flat.flatten(params), None, ()),
        Runner(FLOOR, floor_step, copy_tree(params), grads, (copy_tree(zeros), zeros)),
        optimizer_runner("optax.adam", optax.adam(LR), params, grads),
        optimizer_runner("adam_jax.adam", adam_jax.adam(LR), params, grads),
    ]
    if num_leaves > 1:
        flat_params = flat.flatten(params)
        tx = adam_jax.adam(LR)
        runners.append(
            Runner(
                "adam_jax.adam flat params",
                adam_step(tx),
                flat_params,
                flat_params.layout.flatten(grads),
                tx.init(flat_params),
            )
        )
        runners.append(
            optimizer_runner(
                "flat(adam_jax.adam) tree params", flat.flat(adam_jax.adam(LR)), params, grads
            )
        )
    else:
        bf16 = adam_jax.adam(LR, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
        runners.append(optimizer_runner("adam_jax.adam bf16 moments", bf16, params, grads))
        q8 = adam_jax.adam_8bit(LR)
        runners.append(optimizer_runner("adam_jax.adam 8-bit moments", q8, params, grads))
        if jax.default_backend() == "gpu":  # the fused kernel (issue 51) runs on a GPU only
            fused = adam_jax.adam(LR, **eight_bit.fused_moments("pallas"))
            if eight_bit.kernel_compiles(fused, params, grads):
                name = "adam_jax.adam 8-bit fused kernel"
                runners.append(optimizer_runner(name, fused, params, grads))
    return runners


def measure(trees: tuple[tuple[int, int], ...], repeats: int) -> list[Row]:
    rows = []
    for num_leaves, leaf_size in trees:
        n = num_leaves * leaf_size
        runners = tree_runners(num_leaves, leaf_size)
        interleaved(runners, repeats)
        stream, floor = runners[0].median, runners[1].median
        # The time 28 bytes per parameter take at the streaming bandwidth: the bandwidth floor.
        bandwidth_floor = BYTES_PER_PARAM * n / (STREAM_BYTES_PER_PARAM * n / stream)
        for runner in runners:
            med = runner.median
            per_param = STREAM_BYTES_PER_PARAM if runner.name == STREAM else BYTES_PER_PARAM
            gb_per_s = per_param * n / med / 1e9
            rows.append(
                {
                    "tree": f"{num_leaves} x {leaf_size}",
                    "num_leaves": num_leaves,
                    "leaf_size": leaf_size,
                    "variant": runner.name,
                    "median_ms": 1e3 * med,
                    "min_ms": 1e3 * min(runner.times),
                    "gb_per_s": gb_per_s,
                    "vs_floor": med / floor,
                    "vs_bandwidth_floor": med / bandwidth_floor,
                    "bandwidth_floor_ms": 1e3 * bandwidth_floor,
                    "repeats": len(runner.times),
                }
            )
            print(
                f"  {num_leaves:5d} x {leaf_size:9d} {runner.name:34s} {1e3 * med:9.2f} ms "
                f"{gb_per_s:6.2f} GB/s  x{med / floor:.2f} floor  "
                f"x{med / bandwidth_floor:.2f} bandwidth floor",
                flush=True,
            )
            runner.release()
    return rows


def run(settings: Settings) -> list[Row]:
    trees = QUICK_TREES if settings.quick else TREES
    return measure(trees, settings.repeats_or(REPEATS))
