"""``state_bytes``: bytes of optimizer state per parameter for each moment storage option.

Computed from abstract shapes (``jax.eval_shape`` of ``init``): nothing is allocated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax
from adam_jax import quantization
from benchmarks.harness import LR, Row, Settings
from benchmarks.models import abstract_flat_params, cnn_model, transformer_params

EIGHT_BIT = "8-bit mu + nu"


def trees() -> dict[str, Any]:
    key = jax.random.key(0)
    return {
        "1 x 16M": {"w": jax.ShapeDtypeStruct((16_000_000,), jnp.float32)},
        "transformer-like": jax.eval_shape(lambda: transformer_params(key)),
        "mnist_cnn": jax.eval_shape(lambda: cnn_model()[0]),
    }


def storage_options() -> dict[str, optax.GradientTransformation]:
    return {
        "optax.adam (float32)": optax.adam(LR),
        "float32": adam_jax.adam(LR),
        "bfloat16 mu": adam_jax.adam(LR, mu_dtype=jnp.bfloat16),
        "bfloat16 mu + nu": adam_jax.adam(LR, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
        EIGHT_BIT: adam_jax.adam_8bit(LR),
        "8-bit mu + bfloat16 nu": adam_jax.adam(
            LR, mu_dtype=quantization.BlockwiseQuantized(signed=True), nu_dtype=jnp.bfloat16
        ),
    }


def measure() -> list[Row]:
    options = storage_options()
    rows = []
    for tree_name, tree in trees().items():
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
        # On flat params the small leaves share the big buffer, so they get quantized too.
        cases = [(name, tx, tree) for name, tx in options.items()]
        cases.append((f"{EIGHT_BIT}, flat params", options[EIGHT_BIT], abstract_flat_params(tree)))
        for name, tx, params in cases:
            state_bytes = adam_jax.state_bytes(jax.eval_shape(tx.init, params))
            rows.append(
                {
                    "tree": tree_name,
                    "num_params": n,
                    "storage": name,
                    "state_bytes": state_bytes,
                    "bytes_per_param": state_bytes / n,
                }
            )
    return rows


def run(settings: Settings) -> list[Row]:
    del settings  # Abstract shapes: the same at every size setting.
    return measure()
