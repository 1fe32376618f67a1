"""The offload section's 98M transformer (12 blocks, d = 768, vocabulary 8192, 1024 positions),
its train step compiled for a GPU that is not there: float32 AdamW with its state on the device,
and offloaded (:func:`adam_jax.offload_state`) in the tree's order or in the order the backward
pass computes the gradients (:func:`adam_jax.gradient_order`), with and without a prefetch.

Each row: kernels, the kernel before which the first host copy starts, the share of the copied
bytes whose copy overlaps a kernel, temporaries, and the time model's milliseconds
(:mod:`benchmarks.time_model`, whose copy stream runs beside the kernels) with the ratio to
the step on the device. The offload section measured the tree's order on an H200 (1.77x).
``--prefetch 8 16`` adds rows of the gradient order at those prefetch depths.

    python -m benchmarks.offload_order --card h200 --out benchmarks/results/offload_order_h200.json
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

from benchmarks import accelerators

#: (name, offloaded, prefetch, in the gradients' order)
SETTINGS = (
    ("on the device", False, 0, False),
    ("offloaded", True, 0, False),
    ("offloaded, prefetch=1", True, 1, False),
    ("offloaded, prefetch=4", True, 4, False),
    ("offloaded, gradient order", True, 0, True),
    ("offloaded, gradient order, prefetch=1", True, 1, True),
    ("offloaded, gradient order, prefetch=4", True, 4, True),
)


def step_program(
    tx: Any, card: str, *, offloaded: bool, train: bool, params: Any = None
) -> accelerators.Compiled:
    """``tx``'s optimizer step (``train`` false) or whole train step (the transformer's loss on
    :data:`benchmarks.sections.offload.GPU_BATCH` tokens) on the 98M transformer, compiled for
    ``card`` with its params and state donated, the state in host memory where ``offloaded``."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from benchmarks.harness import adam_step
    from benchmarks.models import transformer_loss
    from benchmarks.sections import offload
    from benchmarks.sections.train_step import tree_train_step

    params = transformer_tree() if params is None else params
    device = SingleDeviceSharding(accelerators.devices(accelerators.TARGETS[card])[0])
    batch = jax.ShapeDtypeStruct(offload.GPU_BATCH, jnp.int32) if train else params
    step = functools.partial(tree_train_step, loss=transformer_loss)(tx) if train else adam_step(tx)
    state = jax.eval_shape(tx.init, params)
    args = tuple(accelerators.placed(t, device) for t in (params, batch, state))
    host = {2: offload.host_leaves(tx, args[0])} if offloaded else None
    return accelerators.compile_for(step, args, (0, 2), keep_unused=True, host_leaves=host)


def transformer_tree() -> Any:
    """The 98M transformer's params, as shapes."""
    import jax

    from benchmarks.models import transformer_params
    from benchmarks.sections import offload

    return jax.eval_shape(lambda: transformer_params(jax.random.key(0), **offload.GPU_TREE))


def rows(card: str, deeper: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """The rows of :data:`SETTINGS`, then the gradient order at each prefetch depth of
    ``deeper``."""
    import jax
    import jax.numpy as jnp

    import adam_jax
    from benchmarks import time_model
    from benchmarks.harness import LR
    from benchmarks.hlo_program import read_program, transfer_overlap
    from benchmarks.models import transformer_loss
    from benchmarks.sections import offload

    params = transformer_tree()
    tokens = jax.ShapeDtypeStruct(offload.GPU_BATCH, jnp.int32)
    order = adam_jax.gradient_order(transformer_loss, params, tokens)
    found: list[dict[str, Any]] = []
    extra = tuple((f"offloaded, gradient order, prefetch={p}", True, p, True) for p in deeper)
    for name, offloaded, prefetch, by_gradients in SETTINGS + extra:
        tx = adam_jax.adamw(LR)
        if offloaded:
            tx = adam_jax.offload_state(
                tx, prefetch=prefetch, leaf_order=order if by_gradients else None
            )
        compiled = step_program(tx, card, offloaded=offloaded, train=True, params=params)
        program = read_program(compiled.text)
        overlap = transfer_overlap(compiled.text)
        moved = sum(size for size, _ in overlap)
        copies = [i for i, k in enumerate(program.kernels) if k.transfer_bytes]
        row = {
            "setting": name,
            "kernels": program.kernel_count,
            "first_copy_at_kernel": copies[0] if copies else None,
            "transfers_overlapping": (
                sum(size for size, k in overlap if k) / moved if moved else None
            ),
            "temporaries": compiled.memory["temporaries"],
            "model_ms": round(1e3 * time_model.predict(program, card), 3),
        }
        row["ratio"] = round(row["model_ms"] / found[0]["model_ms"], 3) if found else 1.0
        found.append(row)
        print(json.dumps(row), flush=True)
    return found


def markdown(found: list[dict[str, Any]]) -> str:
    lines = [
        "| step | first copy at kernel | copied bytes overlapping a kernel | model ms | "
        "x on the device |",
        "|---|---|---|---|---|",
    ]
    for row in found:
        first = row["first_copy_at_kernel"]
        at = "" if first is None else f"{first} of {row['kernels']}"
        share = row["transfers_overlapping"]
        overlap = "" if share is None else f"{share:.0%}"
        lines.append(
            f"| {row['setting']} | {at} | {overlap} | {row['model_ms']:.2f} | {row['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.offload_order")
    parser.add_argument("--card", choices=("h100", "h200"), default="h200")
    parser.add_argument("--out", type=Path, help="write the rows to this JSON file")
    parser.add_argument(
        "--prefetch",
        type=int,
        nargs="+",
        default=(),
        help="more rows: the gradient order at these prefetch depths",
    )
    args = parser.parse_args(argv)
    accelerators.enable_or_exit(parser)
    found = rows(args.card, tuple(args.prefetch))
    if args.out is not None:
        args.out.write_text(json.dumps(found, indent=2) + "\n")
    print(markdown(found))


if __name__ == "__main__":
    main()
