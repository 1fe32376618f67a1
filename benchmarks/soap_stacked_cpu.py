"""SOAP's setting to use on the CPU, its state stacked by block shape (``stack_blocks=True``)
against leaf by leaf: the median time of a cycle of ``FREQUENCY`` steps (one refresh), the two
interleaved in one process, on the transformer-like tree of ``benchmarks.models`` (16 blocks).

    python -m benchmarks.soap_stacked_cpu --width 64 --repeats 20

To compare two checkouts, run it with each one's ``adam_jax`` first on the path (``python -P``
with ``PYTHONPATH``) and compare the ratios.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import jax
import jax.numpy as jnp

import adam_jax
from benchmarks.harness import LR, Runner, copy_tree, interleaved
from benchmarks.models import transformer_params
from benchmarks.sections.soap import FREQUENCY, cycle


def setting(stack_blocks: bool, width: int) -> Any:
    """SOAP's setting to use (docs/memory.md), blocks of at most 128."""
    return adam_jax.soap(
        LR,
        precondition_frequency=FREQUENCY,
        block_size=min(128, width),
        factor_dtype=jnp.bfloat16,
        basis_dtype=jnp.bfloat16,
        mu_dtype=adam_jax.BlockwiseQuantized(),
        nu_dtype=jnp.bfloat16,
        basis_rectification=0,
        stack_blocks=stack_blocks,
    )


def measure(width: int, repeats: int) -> dict[str, Any]:
    """Medians (ms a step) of both forms and their ratio, stacked over leaf by leaf."""
    params = transformer_params(jax.random.key(0), d=width, ff=4 * width)
    grads = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), params)
    runners = []
    for stacked in (False, True):
        tx = setting(stacked, width)
        p = copy_tree(params)
        runners.append(Runner(f"stacked={stacked}", cycle(tx), p, copy_tree(grads), tx.init(p)))
    interleaved(runners, repeats)
    leaf_by_leaf, stacked = (1e3 * r.median / FREQUENCY for r in runners)
    return {
        "width": width,
        "leaf_by_leaf_ms": round(leaf_by_leaf, 2),
        "stacked_ms": round(stacked, 2),
        "stacked_over_leaf_by_leaf": round(stacked / leaf_by_leaf, 3),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soap_stacked_cpu", description=__doc__
    )
    parser.add_argument("--width", type=int, default=64, help="the model width d (default 64)")
    parser.add_argument("--repeats", type=int, default=20, help="timed cycles of each form")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.width, args.repeats)))


if __name__ == "__main__":
    main()
