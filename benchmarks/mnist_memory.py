"""MNIST CNN with the memory-saving settings of issue 23 against float32 Adam.

Six settings of Adam without weight decay on the examples' ``cnn`` and recipe (as
``benchmarks.mnist_low_precision``: batch 128, random shifts of 2 pixels, warm-up of half an
epoch then cosine decay from 3e-3), the same init and batches for each seed: float32 Adam;
Adam-mini (``adam_jax.adam_mini``, one second moment per output neuron or channel); 4-bit
moments (``adam_jax.quantization.four_bit_moments``); the second moment factored into row and
column means (``adam_jax.factored_second_moment``); and bfloat16 params with stochastic
rounding, a 4-bit first moment and an Adam-mini or a factored second moment. Records the test
accuracy and the bytes of params and optimizer state per parameter, and prints the table of
docs/memory.md::

    python -m benchmarks.mnist_memory --seeds 0 1 2 --epochs 3 \\
        --data-dir ../shared/data/mnist --out benchmarks/results/mnist_memory.json

Runs already in ``--out`` are kept (the command resumes); ``--settings`` runs a subset.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

import adam_jax
from adam_jax import quantization
from benchmarks.mnist_low_precision import Setting, command

# The CNN's kernels are (3, 3, 1, 32), (3, 3, 32, 64), (3136, 256) and (256, 10): 32 factors
# the two large ones, conv2 (per kernel position) and dense1 (98% of the params); the other
# two keep their whole second moment, a second axis of 1 or 10 saving little.
FACTOR_MIN_DIM = 32


def _four_bit_mu() -> Any:
    return quantization.four_bit_moments()["mu_dtype"]


def _factored_nu() -> Any:
    return adam_jax.factored_second_moment(FACTOR_MIN_DIM)


def _adam_mini(lr: Any, mu_dtype: Any = None) -> optax.GradientTransformation:
    return adam_jax.adam_mini(lr, weight_decay=0.0, mu_dtype=mu_dtype)


BASELINE = "float32 Adam"

# name -> setting
SETTINGS: dict[str, Setting] = {
    BASELINE: (lambda lr, seed: adam_jax.adam(lr), jnp.float32),
    "Adam-mini": (lambda lr, seed: _adam_mini(lr), jnp.float32),
    "4-bit moments": (
        lambda lr, seed: adam_jax.adam(lr, **quantization.four_bit_moments()),
        jnp.float32,
    ),
    "factored nu": (lambda lr, seed: adam_jax.adam(lr, nu_dtype=_factored_nu()), jnp.float32),
    "bfloat16 + SR, 4-bit mu, Adam-mini nu": (
        lambda lr, seed: adam_jax.stochastic_rounding(
            _adam_mini(lr, mu_dtype=_four_bit_mu()), key=seed
        ),
        jnp.bfloat16,
    ),
    "bfloat16 + SR, 4-bit mu, factored nu": (
        lambda lr, seed: adam_jax.stochastic_rounding(
            adam_jax.adam(lr, mu_dtype=_four_bit_mu(), nu_dtype=_factored_nu()), key=seed
        ),
        jnp.bfloat16,
    ),
}


def main(argv: list[str] | None = None) -> None:
    description = __doc__.splitlines()[0]
    command(SETTINGS, BASELINE, description, "benchmarks/results/mnist_memory.json", argv)


if __name__ == "__main__":
    main()
