"""A byte-level language model with the memory-saving settings of issue 23 against AdamW.

The model, corpus, schedule, batches and held-out loss of ``benchmarks.lm_low_precision``
(4 blocks, d = 64, 4 heads; warm-up and cosine decay from ``--peak``; the same init and
windows for a seed), with AdamW instead of Adam: weight decay 0.01 on the matrices (leaves of
two or more axes) in every setting. The six settings of ``benchmarks.mnist_memory``: float32
AdamW; Adam-mini; 4-bit moments; the second moment factored into row and column means;
bfloat16 params with stochastic rounding, a 4-bit first moment and an Adam-mini or a factored
second moment; and Adam-mini with the position embedding read as an embedding. Writes per run
the train-loss curve (the mean over each 50 steps) and the held-out loss to JSON, and prints
the table of docs/memory.md. The peak learning rate is tuned: a sweep on seed 0 for AdamW and
Adam-mini, then three seeds of the AdamW settings (its storages) at
AdamW's best rate and of the Adam-mini ones at Adam-mini's::

    python -m benchmarks.lm_memory --steps 1000 --seeds 0 --settings "float32 AdamW" Adam-mini \\
        --peak 1e-3 2e-3 4e-3 6e-3 8e-3 1.2e-2 1.6e-2 2e-2 3.2e-2 \\
        --out benchmarks/results/lm_memory.json
    python -m benchmarks.lm_memory --steps 1000 --seeds 0 1 2 --peak 8e-3 \\
        --settings "float32 AdamW" "4-bit moments" "factored nu" \\
        "bfloat16 + SR, 4-bit mu, factored nu" --out benchmarks/results/lm_memory.json
    python -m benchmarks.lm_memory --steps 1000 --seeds 0 1 2 --peak 1.6e-2 \\
        --settings Adam-mini "bfloat16 + SR, 4-bit mu, Adam-mini nu" \\
        --out benchmarks/results/lm_memory.json

A later stop tuned factored nu's own rate (best 1.6e-2) and added Adam-mini with the position
embedding partitioned per position (``positions_as_embedding``; best 1.2e-2), each on seed 0
over a grid and then on seeds 1 and 2 at the best rate (the commands in docs/memory.md).

Runs already in ``--out`` are kept (the commands resume, and processes may share the file);
``--settings`` runs a subset.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import optax

import adam_jax
from adam_jax import quantization
from benchmarks.lm_low_precision import arguments, study
from benchmarks.mnist_low_precision import Setting
from benchmarks.models import transformer_loss

WEIGHT_DECAY = 0.01
# The attention heads the model splits its query and key kernels in, for Adam-mini's blocks.
HEADS: int = inspect.signature(transformer_loss).parameters["heads"].default
# Every matrix of the model is at least 64 x 64 (embeddings, attention, MLP, output): all are
# factored, as in the memory section (benchmarks/sections/memory.py).
FACTOR_MIN_DIM = 64


def matrices(params: Any) -> Any:
    """The decay mask: the leaves with two or more axes (not the norms' scales and biases)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _adamw(lr: Any, **moments: Any) -> optax.GradientTransformation:
    return adam_jax.adamw(lr, weight_decay=WEIGHT_DECAY, mask=matrices, **moments)


def _adam_mini(
    lr: Any, mu_dtype: Any = None, partition: Any = None
) -> optax.GradientTransformation:
    return adam_jax.adam_mini(
        lr,
        weight_decay=WEIGHT_DECAY,
        mask=matrices,
        num_heads=HEADS,
        mu_dtype=mu_dtype,
        partition=partition,
    )


def positions_as_embedding(params: Any) -> Any:
    """The authors' partition with the position embedding ``pos`` (positions x features) read
    as an embedding, one block per position, as their code reads a table named like one
    (``embed_positions``). By its name ``pos`` is a kernel to the default partition: one
    block per feature, across positions."""
    storages = adam_jax.adam_mini_partition(HEADS)(params)
    return {**storages, "pos": adam_jax.block_means((1, params["pos"].shape[1]))}


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
    parser = arguments(SETTINGS, description, "benchmarks/results/lm_memory.json")
    study(SETTINGS, BASELINE, parser, argv, "benchmarks.lm_memory")


if __name__ == "__main__":
    main()
