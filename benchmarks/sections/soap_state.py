"""``soap_state``: SOAP's state bytes per parameter at GPT-2 small's shapes, per setting.

From abstract shapes (``jax.eval_shape(tx.init, params)``: nothing is allocated), on GPT-2
small's parameter tree (:func:`benchmarks.sections.offload.gpt2_small`: 12 blocks, d = 768,
vocabulary 50257, an untied head; 163M params). Each setting adds one option to the one
before: blocks of 128, bfloat16 Kronecker factors, 8-bit Adam moments, bfloat16 eigenbases,
8-bit eigenbases; then, apart, the bfloat16 bases' setting with a bfloat16 second moment. Two
columns: at the authors' ``max_precond_dim`` (10000: the vocabulary's
side of the embedding and head gets no factor) and with both sides of every matrix
preconditioned (``max_precond_dim=60000``). AdamW's 8 bytes for scale.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp

import adam_jax
from benchmarks.harness import LR, Row, Settings
from benchmarks.sections.offload import gpt2_small, transformer_like
from benchmarks.sections.soap import PRACTICAL

BOTH_SIDES = 60000  # above GPT-2's vocabulary: every dimension of every matrix preconditioned

#: Each setting's one option, added to those of the settings before it.
STEPS: dict[str, dict[str, Any]] = {
    "float32": {},
    "block_size=128": {"block_size": 128},
    "+ bfloat16 factors": {"factor_dtype": jnp.bfloat16},
    "+ 8-bit mu and nu": adam_jax.eight_bit_moments(),
    "+ bfloat16 bases": {"basis_dtype": jnp.bfloat16},
    "+ 8-bit bases instead": {"basis_dtype": adam_jax.quantization.BlockwiseQuantized()},
}
#: name -> SOAP's options.
SETTINGS: dict[str, dict[str, Any]] = dict(
    zip(STEPS, itertools.accumulate(STEPS.values(), lambda a, b: {**a, **b}), strict=True)
)
#: Apart from the chain: the compressed setting with its second moment in bfloat16, whose
#: race loss stays within 1% of float32 SOAP's (benchmarks.sections.soap.PRACTICAL).
PRACTICAL_NAME = "bfloat16 bases, 8-bit mu, bfloat16 nu"
SETTINGS[PRACTICAL_NAME] = PRACTICAL


def bytes_per_param(tx: Any, params: Any) -> float:
    size = sum(p.size for p in jax.tree.leaves(params))
    return adam_jax.state_bytes(jax.eval_shape(tx.init, params)) / size


def measure(tree: str, params: Any) -> list[Row]:
    adamw = bytes_per_param(adam_jax.adamw(LR), params)
    rows = [
        {
            "tree": tree,
            "setting": "AdamW",
            "state_bytes_per_param": adamw,
            "both_sides_state_bytes_per_param": adamw,  # no factors: nothing to precondition
        }
    ]
    for name, options in SETTINGS.items():
        row = {
            "tree": tree,
            "setting": name,
            "state_bytes_per_param": bytes_per_param(adam_jax.soap(LR, **options), params),
            "both_sides_state_bytes_per_param": bytes_per_param(
                adam_jax.soap(LR, max_precond_dim=BOTH_SIDES, **options), params
            ),
        }
        rows.append(row)
        print(
            f"  {tree}, {name}: {row['state_bytes_per_param']:.2f} bytes/param, "
            f"{row['both_sides_state_bytes_per_param']:.2f} with both sides preconditioned",
            flush=True,
        )
    return rows


def run(settings: Settings) -> list[Row]:
    if settings.quick:
        return measure("transformer-like", transformer_like())
    return measure("GPT-2 small", gpt2_small())
