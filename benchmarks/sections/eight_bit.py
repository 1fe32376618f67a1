"""``eight_bit``: step time of 8-bit moments relative to float32 moments.

One jitted, donating step (update + ``optax.apply_updates``) on one float32 leaf of 4M elements,
timed in the same rounds (interleaved), for:

- ``adam_jax.adam(1e-3)``: float32 moments, the reference;
- ``adam_jax.adam_8bit(1e-3)``: block-wise 8-bit moments with the dynamic map;
- ``adam_8bit, in slices``: the same in ``adam_jax.step_in_slices`` (slices of 2^20 entries:
  the leaf decoded, stepped and encoded a quarter at a time, in place);
- ``linear int8 blocks``: the same dataflow as the 8-bit moments (a block maximum, a scale, an
  encode and a decode per element, blocks of 256) with the cheapest codec there is, a rounded
  linear int8 code. Not a usable optimizer (the second moment loses its small values); its
  step time is what the dataflow alone costs on this compiler, a floor for any codec.

Then the fused kernel (``BlockwiseQuantized(kernel="auto")``: one Pallas kernel a leaf, issue
51) on 16M params as one leaf and as 16 leaves of 1M, the `steps` trees: ``adam_jax.adam``,
``adam_jax.adam_8bit`` (the XLA operations) and ``adam_8bit, fused kernel``, timed in the same
rounds. On a GPU only: elsewhere ``"auto"`` is the XLA path, and the kernel runs there only in
Pallas' interpret mode, which ``--quick`` times on a tiny tree as a smoke test of the rows.

``ratio_vs_float32`` is the median over rounds of a variant's time over the float32 time in
that round (issue 8 targets at most 3 for the 8-bit step on CPU, 1.2 on GPU);
``page_faults_per_step`` the minor page faults of the process during a step (temporaries that
XLA:CPU allocates and touches anew).
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import adam_jax
from adam_jax.quantization import BlockwiseQuantized, QuantizedArray
from benchmarks.harness import LR, Row, Settings, adam_step
from benchmarks.sections import leaves

TREES = ((1, 4 * 1024 * 1024),)
QUICK_TREES = ((1, 64 * 1024),)
KERNEL_TREES = ((1, 16_000_000), (16, 1_000_000))
QUICK_KERNEL_TREES = ((2, 4096),)
KERNEL = "adam_8bit, fused kernel"
REPEATS = 40
BLOCK = 256
SLICE_ELEMENTS = 1 << 20


@dataclasses.dataclass(frozen=True)
class LinearInt8Blocks(adam_jax.MomentStorage):
    """Blocks of ``BLOCK`` consecutive elements (leaves whose size is a multiple of it), each
    stored as ``round(127 x / max|x|)`` in int8 plus its float32 maximum."""

    def init(self, param: Any) -> QuantizedArray:
        return QuantizedArray(
            codes=jnp.zeros(param.shape, jnp.int8),
            absmax=jnp.zeros((param.size // BLOCK,), jnp.float32),
        )

    def load(self, stored: QuantizedArray) -> jax.Array:
        blocks = stored.codes.reshape(-1, BLOCK).astype(jnp.float32)
        return (blocks * (stored.absmax[:, None] / 127.0)).reshape(stored.codes.shape)

    def store(self, value: jax.Array, stored: QuantizedArray) -> QuantizedArray:
        blocks = value.reshape(-1, BLOCK)
        absmax = jnp.max(jnp.abs(blocks), axis=1)
        scale = jnp.where(absmax > 0, 127.0 / absmax, 0.0)
        codes = jnp.round(blocks * scale[:, None]).astype(jnp.int8)
        return QuantizedArray(codes=codes.reshape(value.shape), absmax=absmax)


def _variants() -> Sequence[tuple[str, optax.GradientTransformation]]:
    linear = LinearInt8Blocks()
    return (
        ("adam_jax.adam", adam_jax.adam(LR)),
        ("adam_jax.adam_8bit", adam_jax.adam_8bit(LR)),
        ("adam_8bit, in slices", adam_jax.step_in_slices(adam_jax.adam_8bit(LR), SLICE_ELEMENTS)),
        ("linear int8 blocks", adam_jax.adam(LR, mu_dtype=linear, nu_dtype=linear)),
    )


def fused_moments(kernel: str) -> dict[str, Any]:
    """8-bit moments at their defaults, stepped by the fused kernel in mode ``kernel``."""
    return {
        "mu_dtype": BlockwiseQuantized(signed=True, kernel=kernel),
        "nu_dtype": BlockwiseQuantized(signed=False, kernel=kernel),
    }


def _kernel_variants(kernel: str) -> Sequence[tuple[str, optax.GradientTransformation]]:
    fused = adam_jax.adam(LR, **fused_moments(kernel))
    return (
        ("adam_jax.adam", adam_jax.adam(LR)),
        ("adam_jax.adam_8bit", adam_jax.adam_8bit(LR)),
        (KERNEL, fused),
    )


def kernel_rows(settings: Settings) -> list[Row]:
    """The fused kernel against the XLA path and float32 (on a GPU; interpreted and tiny with
    ``--quick`` elsewhere; nothing otherwise)."""
    on_gpu = jax.default_backend() == "gpu"
    if not (on_gpu or settings.quick):
        print("  fused kernel: not on a GPU, skipped", flush=True)
        return []
    kernel = "pallas" if on_gpu else "interpret"
    rows = []
    for tree in KERNEL_TREES if on_gpu else QUICK_KERNEL_TREES:
        try:
            measured = leaves.measure(
                (tree,),
                settings.repeats_or(REPEATS, quick=3),
                lambda: _kernel_variants(kernel),
                ratio_key="ratio_vs_float32",
            )
        except Exception:  # a kernel that fails on this device must not stop the whole run
            print(f"  fused kernel on {tree}: failed, skipped", flush=True)
            traceback.print_exc()
            continue
        rows += [{**row, "comparison": "fused kernel", "kernel": kernel} for row in measured]
    return rows


def kernel_compiles(tx: optax.GradientTransformation, params: Any, grads: Any) -> bool:
    """Whether the donating step of ``tx`` compiles here (printing why not)."""
    try:
        step = jax.jit(adam_step(tx), donate_argnums=(0, 2))
        step.lower(params, grads, jax.eval_shape(tx.init, params)).compile()
    except Exception:
        traceback.print_exc()
        return False
    return True


def run(settings: Settings) -> list[Row]:
    trees = QUICK_TREES if settings.quick else TREES
    rows = leaves.measure(
        trees, settings.repeats_or(REPEATS, quick=5), _variants, ratio_key="ratio_vs_float32"
    )
    settings.finished.extend(rows)
    return rows + kernel_rows(settings)
