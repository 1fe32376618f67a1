"""A byte-level language model with the memory-saving settings of issue 23 against AdamW.

The model, corpus, schedule, batches and held-out loss of ``benchmarks.lm_low_precision`` (the
language-model example's decoder, 4 blocks, d = 64, 4 heads; warm-up and cosine decay from
``--peak``; the same init and windows for a seed), with AdamW instead of Adam: b2 = 0.95 and
weight decay 0.01 on the matrices (leaves of two or more axes) in every setting (its float32
AdamW is the race's AdamW, ``benchmarks.lm_race``). The settings of
``benchmarks.mnist_memory``: float32 AdamW; Adam-mini; 4-bit moments; the second moment
factored into row and column means; bfloat16 params with stochastic rounding, a 4-bit first
moment and an Adam-mini or a factored second moment; and Adam-mini with the position table
read as an embedding. Writes per run the train-loss curve (the mean over each 50 steps) and
the held-out loss to JSON, and prints the table of docs/memory.md. The peak learning rate is
tuned on seed 0, then seeds 1 and 2 run at the best rate: AdamW's for the settings of its
storages, Adam-mini's for the Adam-mini ones, and their own for factored nu and Adam-mini with
the positions per position::

    python -m benchmarks.lm_memory --steps 1000 --seeds 0 --settings "float32 AdamW" Adam-mini \\
        "factored nu" "Adam-mini, pos per position" --peak 2e-3 4e-3 8e-3 1.2e-2 1.6e-2 3.2e-2
    python -m benchmarks.lm_memory --steps 1000 --seeds 0 1 2 --peak RATE --settings NAME ...

Runs already in ``--out`` (default ``benchmarks/results/lm_memory_small.json``) are kept (the
commands resume, and processes may share the file); a file of another model's runs is refused.
``--settings`` runs a subset.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import adam_jax
from adam_jax import quantization
from benchmarks.lm_low_precision import MODEL, arguments, study
from benchmarks.mnist_low_precision import Setting

WEIGHT_DECAY = 0.01
# The language models' b2 (GPT-3's, the race's and the example's; Adam-mini's authors' for
# GPT-2): with optax's 0.999 this model's training was unstable at every rate above 2e-3 (AdamW
# 1.832 at 4e-3, 1.888 at 8e-3; the factored nu 1.694 at 8e-3, 2.203 at 1.6e-2), so the settings
# ranked by their instability, not by their storage.
B2 = 0.95
# The attention heads of the model, for Adam-mini's blocks.
HEADS = MODEL["heads"]
# Every matrix of the model is at least 64 x 64 (embeddings, attention, MLP, output): all are
# factored, as in the memory section (benchmarks/sections/memory.py).
FACTOR_MIN_DIM = 64


def matrices(params: Any) -> Any:
    """The decay mask: the leaves with two or more axes (not the norms' scales and biases)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _adamw(lr: Any, **moments: Any) -> optax.GradientTransformation:
    return adam_jax.adamw(lr, b2=B2, weight_decay=WEIGHT_DECAY, mask=matrices, **moments)


def _adam_mini(
    lr: Any, mu_dtype: Any = None, partition: Any = None
) -> optax.GradientTransformation:
    return adam_jax.adam_mini(
        lr,
        b2=B2,
        weight_decay=WEIGHT_DECAY,
        mask=matrices,
        num_heads=HEADS,
        mu_dtype=mu_dtype,
        partition=partition,
    )


def positions_as_embedding(params: Any) -> Any:
    """The authors' partition with the position table ``position`` (positions x features) read
    as an embedding, one block per position, as their code reads a table named like one
    (``embed_positions``). By its name ``position`` is a kernel to the default partition: one
    block per feature, across positions."""

    storages = adam_jax.adam_mini_partition(HEADS)(params)
    per_position = adam_jax.block_means((1, MODEL["d_model"]))

    def position_as_embedding(path: tuple[Any, ...], storage: Any) -> Any:
        return per_position if path[0] == jax.tree_util.DictKey("position") else storage

    return jax.tree_util.tree_map_with_path(
        position_as_embedding,
        storages,
        is_leaf=lambda node: isinstance(node, adam_jax.MomentStorage),
    )


def _four_bit_mu() -> Any:
    return quantization.four_bit_moments()["mu_dtype"]


def _factored_nu() -> Any:
    return adam_jax.factored_second_moment(FACTOR_MIN_DIM)


BASELINE = "float32 AdamW"

# name -> setting
SETTINGS: dict[str, Setting] = {
    BASELINE: (lambda lr, seed: _adamw(lr), jnp.float32),
    "Adam-mini": (lambda lr, seed: _adam_mini(lr), jnp.float32),
    "Adam-mini, pos per position": (
        lambda lr, seed: _adam_mini(lr, partition=positions_as_embedding),
        jnp.float32,
    ),
    "4-bit moments": (
        lambda lr, seed: _adamw(lr, **quantization.four_bit_moments()),
        jnp.float32,
    ),
    "factored nu": (lambda lr, seed: _adamw(lr, nu_dtype=_factored_nu()), jnp.float32),
    "bfloat16 + SR, 4-bit mu, Adam-mini nu": (
        lambda lr, seed: adam_jax.stochastic_rounding(
            _adam_mini(lr, mu_dtype=_four_bit_mu()), key=seed
        ),
        jnp.bfloat16,
    ),
    "bfloat16 + SR, 4-bit mu, factored nu": (
        lambda lr, seed: adam_jax.stochastic_rounding(
            _adamw(lr, mu_dtype=_four_bit_mu(), nu_dtype=_factored_nu()), key=seed
        ),
        jnp.bfloat16,
    ),
}


def main(argv: list[str] | None = None) -> None:
    description = __doc__.splitlines()[0]
    parser = arguments(SETTINGS, description, "benchmarks/results/lm_memory_small.json")
    study(SETTINGS, BASELINE, parser, argv, "benchmarks.lm_memory")


if __name__ == "__main__":
    main()
