"""``memory``: bytes per parameter of params + optimizer state, and of the compiled train
step (XLA's memory analysis: arguments, outputs, temporaries), for each memory setting.

On the transformer-like tree of :mod:`benchmarks.models` (16 blocks, d = 64, 4 heads), from
abstract shapes: ``jax.eval_shape`` of ``init`` for the state, and the jitted, donating update
step lowered and compiled for the memory analysis (nothing is run). The temporaries show what
a storage decodes per leaf (8-bit moments, block means, factors) beside the arrays it keeps;
the two settings "in XLA's order" keep the 8-bit and 4-bit moments without putting the leaves
in turn (:meth:`adam_jax.MomentStorage.decodes` False), as the step did before issue 23's
item 6.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax
from adam_jax import quantization
from benchmarks.harness import LR, Row, Settings
from benchmarks.models import transformer_params

HEADS = 4
EIGHT_BIT_MU = quantization.BlockwiseQuantized(signed=True)
FOUR_BIT = quantization.four_bit_moments()
FOUR_BIT_MU = FOUR_BIT["mu_dtype"]
FACTORED = adam_jax.factored_second_moment(64)


def _stochastic(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    return adam_jax.stochastic_rounding(tx, key=0)


def in_xla_order(storage: adam_jax.MomentStorage) -> adam_jax.MomentStorage:
    """``storage`` whose leaves the step does not put in turn (``decodes`` is False): XLA
    orders their decoding as it likes, as before issue 23's item 6, for comparison."""
    kind = type(storage)
    unordered = type(f"{kind.__name__}InXlaOrder", (kind,), {"decodes": lambda self, s: False})
    fields = {f.name: getattr(storage, f.name) for f in dataclasses.fields(storage) if f.init}
    return unordered(**fields)


def _unordered(moments: dict[str, Any]) -> dict[str, Any]:
    return {name: in_xla_order(storage) for name, storage in moments.items()}


#: name -> (params dtype, optimizer).
SETTINGS: dict[str, tuple[Any, Callable[[], optax.GradientTransformation]]] = {
    "float32 AdamW": (jnp.float32, lambda: adam_jax.adamw(LR)),
    "8-bit moments": (jnp.float32, lambda: adam_jax.adamw_8bit(LR)),
    "Adam-mini": (jnp.float32, lambda: adam_jax.adam_mini(LR, num_heads=HEADS)),
    "4-bit moments": (jnp.float32, lambda: adam_jax.adamw(LR, **FOUR_BIT)),
    "8-bit moments, in XLA's order": (
        jnp.float32,
        lambda: adam_jax.adamw(LR, **_unordered(quantization.eight_bit_moments())),
    ),
    "4-bit moments, in XLA's order": (
        jnp.float32,
        lambda: adam_jax.adamw(LR, **_unordered(FOUR_BIT)),
    ),
    "factored nu": (jnp.float32, lambda: adam_jax.adamw(LR, nu_dtype=FACTORED)),
    "Adam-mini, 8-bit mu": (
        jnp.float32,
        lambda: adam_jax.adam_mini(LR, num_heads=HEADS, mu_dtype=EIGHT_BIT_MU),
    ),
    "bfloat16 + Kahan, bfloat16 moments": (
        jnp.bfloat16,
        lambda: adam_jax.kahan_summation(
            adam_jax.adamw(LR, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
        ),
    ),
    "bfloat16 + SR, 8-bit mu, Adam-mini nu": (
        jnp.bfloat16,
        lambda: _stochastic(adam_jax.adam_mini(LR, num_heads=HEADS, mu_dtype=EIGHT_BIT_MU)),
    ),
    "bfloat16 + SR, 8-bit mu, factored nu": (
        jnp.bfloat16,
        lambda: _stochastic(adam_jax.adamw(LR, mu_dtype=EIGHT_BIT_MU, nu_dtype=FACTORED)),
    ),
    "Adam-mini, 4-bit mu": (
        jnp.float32,
        lambda: adam_jax.adam_mini(LR, num_heads=HEADS, mu_dtype=FOUR_BIT_MU),
    ),
    "bfloat16 + SR, 4-bit mu, Adam-mini nu": (
        jnp.bfloat16,
        lambda: _stochastic(adam_jax.adam_mini(LR, num_heads=HEADS, mu_dtype=FOUR_BIT_MU)),
    ),
    "bfloat16 + SR, 4-bit mu, factored nu": (
        jnp.bfloat16,
        lambda: _stochastic(adam_jax.adamw(LR, mu_dtype=FOUR_BIT_MU, nu_dtype=FACTORED)),
    ),
}


def _step(tx: optax.GradientTransformation) -> Callable[..., Any]:
    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def measure(layers: int = 16, names: tuple[str, ...] | None = None) -> list[Row]:
    """A row per setting of ``names`` (``None``: every setting), in that order."""
    tree = jax.eval_shape(lambda: transformer_params(jax.random.key(0), layers=layers))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    rows = []
    for name in SETTINGS if names is None else names:
        dtype, make = SETTINGS[name]
        params = jax.tree.map(lambda x, d=dtype: jax.ShapeDtypeStruct(x.shape, d), tree)
        tx = make()
        state = jax.eval_shape(tx.init, params)
        grads = params
        analysis = _step(tx).lower(params, state, grads).compile().memory_analysis()
        params_bytes = adam_jax.state_bytes(params)
        state_bytes = adam_jax.state_bytes(state)
        rows.append(
            {
                "tree": "transformer-like",
                "num_params": n,
                "setting": name,
                "params_bytes_per_param": params_bytes / n,
                "state_bytes_per_param": state_bytes / n,
                "bytes_per_param": (params_bytes + state_bytes) / n,
                "step_argument_bytes_per_param": analysis.argument_size_in_bytes / n,
                "step_output_bytes_per_param": analysis.output_size_in_bytes / n,
                "step_temp_bytes_per_param": analysis.temp_size_in_bytes / n,
                "step_alias_bytes_per_param": analysis.alias_size_in_bytes / n,
            }
        )
    return rows


def run(settings: Settings) -> list[Row]:
    del settings  # Abstract shapes and compiled programs: the same at every size setting.
    return measure()
