"""MNIST CNN with bfloat16 params: plain, Kahan summation, stochastic rounding (issue 14).

Five settings of ``adam_jax.adam`` on the examples' ``cnn`` and recipe (batch 128, random
shifts of 2 pixels, warm-up of half an epoch then cosine decay from 3e-3), the same init
(float32, rounded to bfloat16) and the same batches for each seed: float32 params; bfloat16
params updated plainly (rounded to nearest); with ``adam_jax.kahan_summation``; with
``adam_jax.stochastic_rounding``; and Kahan with 8-bit moments. The forward and backward
passes compute in float32 throughout; the moments follow the params' dtype (bfloat16 with
bfloat16 params) unless 8-bit. Records the test accuracy and the bytes of params and optimizer
state per parameter, and prints the table of docs/low_precision.md::

    python -m benchmarks.mnist_low_precision --seeds 0 1 2 --epochs 3 \\
        --data-dir ../shared/data/mnist --out benchmarks/results/mnist_low_precision.json

Runs already in ``--out`` are kept (the command resumes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import adam_jax
from adam_jax import quantization
from benchmarks.mnist_8bit import train_one

# An optimizer of the learning rate and the seed, and the params dtype.
Setting = tuple[Callable[[Any, int], optax.GradientTransformation], Any]

# name -> setting
SETTINGS: dict[str, Setting] = {
    "float32": (lambda lr, seed: adam_jax.adam(lr), jnp.float32),
    "bfloat16": (lambda lr, seed: adam_jax.adam(lr), jnp.bfloat16),
    "bfloat16 + Kahan": (
        lambda lr, seed: adam_jax.kahan_summation(adam_jax.adam(lr)),
        jnp.bfloat16,
    ),
    "bfloat16 + stochastic rounding": (
        lambda lr, seed: adam_jax.stochastic_rounding(adam_jax.adam(lr), key=seed),
        jnp.bfloat16,
    ),
    "bfloat16 + Kahan + 8-bit moments": (
        lambda lr, seed: adam_jax.kahan_summation(
            adam_jax.adam(lr, **quantization.eight_bit_moments())
        ),
        jnp.bfloat16,
    ),
}


def table(runs: list[dict[str, Any]], settings: dict[str, Setting], baseline: str) -> str:
    """The markdown table: mean accuracy over seeds, its difference from the baseline's, bytes."""
    lines = [
        f"| setting | seeds | mean test accuracy | per seed | vs {baseline} | bytes / param: "
        "params + optimizer state |",
        "|---|---|---|---|---|---|",
    ]
    means = {}
    for name in settings:
        mine = sorted((r for r in runs if r["setting"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        accuracies = [100 * r["test_accuracy"] for r in mine]
        means[name] = statistics.mean(accuracies)
        versus = (
            ""
            if name == baseline or baseline not in means
            else (f"{means[name] - means[baseline]:+.2f} pp")
        )
        per_param = mine[0]["param_bytes_per_param"], mine[0]["state_bytes_per_param"]
        lines.append(
            f"| {name} | {len(mine)} | {means[name]:.2f}% | "
            f"{', '.join(f'{a:.2f}' for a in accuracies)} | {versus} | "
            f"{per_param[0]:.2f} + {per_param[1]:.2f} = {sum(per_param):.2f} |"
        )
    return "\n".join(lines)


def run(
    settings: dict[str, Setting],
    seeds: list[int],
    epochs: int,
    dataset: Any,
    out: Path,
    train_limit: int | None = None,
) -> list[dict[str, Any]]:
    """Trains each setting for each seed, skipping the runs already in ``out``, and writes
    ``out`` after each run; returns all of its runs."""
    from examples.mnist import models

    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    num_params = sum(x.size for x in jax.tree.leaves(jax.tree.map(jnp.asarray, _params(models))))
    for seed in seeds:
        for name, (factory, dtype) in settings.items():
            if any(r["seed"] == seed and r["setting"] == name for r in runs):
                continue
            start = time.perf_counter()
            accuracy, state_bytes = train_one(
                lambda lr, factory=factory, seed=seed: factory(lr, seed),
                seed,
                epochs,
                dataset,
                train_limit=train_limit,
                param_dtype=dtype,
            )
            runs.append(
                {
                    "setting": name,
                    "seed": seed,
                    "epochs": epochs,
                    "train_limit": train_limit,
                    "test_accuracy": accuracy,
                    "param_bytes_per_param": jnp.dtype(dtype).itemsize,
                    "state_bytes_per_param": state_bytes / num_params,
                    "seconds": time.perf_counter() - start,
                }
            )
            out.write_text(json.dumps({"runs": runs}, indent=2))  # each run, as it ends
            print(json.dumps(runs[-1]), flush=True)
    return runs


def command(
    settings: dict[str, Setting],
    baseline: str,
    description: str,
    default_out: str,
    argv: list[str] | None = None,
) -> None:
    """The command line of a study of ``settings``: runs them and prints the table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=default_out)
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=list(settings),
        default=list(settings),
        metavar="NAME",
        help="a subset of the settings to run (default: all); quote names with spaces",
    )
    args = parser.parse_args(argv)

    from examples.mnist import data as data_lib

    chosen = {name: setting for name, setting in settings.items() if name in args.settings}
    dataset = data_lib.load("mnist", args.data_dir)
    runs = run(chosen, args.seeds, args.epochs, dataset, Path(args.out), args.train_limit)
    print(table(runs, settings, baseline))


def main(argv: list[str] | None = None) -> None:
    description = __doc__.splitlines()[0]
    command(SETTINGS, "float32", description, "benchmarks/results/mnist_low_precision.json", argv)


def _params(models: Any) -> Any:
    from flax import nnx

    return nnx.state(models.create("cnn", 0), nnx.Param)


if __name__ == "__main__":
    main()
