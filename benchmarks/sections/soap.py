"""``soap``: SOAP's step against AdamW's on transformer matrices, and the share of it spent
refreshing the eigenbases.

SOAP refreshes its eigenbases (power iteration and QR) every ``precondition_frequency`` steps,
so one step in ten at the default is dearer than the rest. Each runner here is a jitted,
donating cycle of ``FREQUENCY`` optimizer steps (update + apply, a ``fori_loop``) on the
transformer-like tree of ``benchmarks.models`` (4 blocks; d x d attention, d x 4d MLP and
256 x d embedding matrices, all preconditioned): ``adam_jax.adamw``, ``adam_jax.soap`` at
``precondition_frequency=FREQUENCY`` (one refresh per cycle) and ``adam_jax.soap`` that never
refreshes after its first step, and ``adam_jax.soap`` with ``block_size=BLOCK_SIZE`` (each
matrix cut into blocks of at most 128 x 128, each its own SOAP: no factor wider than 128),
timed in the same rounds (interleaved). ``ratio_vs_adamw`` is the median over rounds of SOAP's
cycle time over AdamW's (``block_ratio_vs_adamw`` alike for the blocked SOAP);
``eigenbasis_share``, the median of 1 - (never refreshing) / (refreshing): the share of SOAP's
time that the refreshes take.
"""

from __future__ import annotations

import statistics
from typing import Any

import jax
import jax.numpy as jnp
import optax

import adam_jax
from benchmarks.harness import LR, Row, Runner, Settings, copy_tree, interleaved
from benchmarks.models import transformer_params

FREQUENCY = 10
BLOCK_SIZE = 128
NEVER = 2**30  # a precondition_frequency no run reaches: the bases of the first step stay
WIDTHS = (64, 256)
QUICK_WIDTHS = (16,)
REPEATS = 10


def cycle(tx: optax.GradientTransformation) -> Any:
    """``FREQUENCY`` steps of ``tx`` on fixed gradients, as one call."""

    def steps(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
        def body(_: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
            params, state = carry
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return jax.lax.fori_loop(0, FREQUENCY, body, (params, state))

    return steps


def measure(widths: tuple[int, ...], repeats: int) -> list[Row]:
    rows = []
    for d in widths:
        params = transformer_params(jax.random.key(0), layers=4, d=d, ff=4 * d, seq=64)
        grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) * 1e-2, params)
        num_params = sum(p.size for p in jax.tree.leaves(params))
        candidates = {
            "adam_jax.adamw": adam_jax.adamw(LR),
            "adam_jax.soap": adam_jax.soap(LR, precondition_frequency=FREQUENCY),
            "soap, never refreshing": adam_jax.soap(LR, precondition_frequency=NEVER),
            f"soap, block_size={BLOCK_SIZE}": adam_jax.soap(
                LR, precondition_frequency=FREQUENCY, block_size=BLOCK_SIZE
            ),
        }
        runners = {
            name: Runner(name, cycle(tx), copy_tree(params), grads, tx.init(params))
            for name, tx in candidates.items()
        }
        interleaved(list(runners.values()), repeats)
        adamw, soap, never, blocked = runners.values()
        row = {
            "tree": f"transformer-like, d = {d}",
            "num_params": num_params,
            "precondition_frequency": FREQUENCY,
            "adamw_ms_per_step": 1e3 * adamw.median / FREQUENCY,
            "soap_ms_per_step": 1e3 * soap.median / FREQUENCY,
            "ratio_vs_adamw": statistics.median(
                s / a for s, a in zip(soap.times, adamw.times, strict=True)
            ),
            "eigenbasis_share": statistics.median(
                1 - n / s for n, s in zip(never.times, soap.times, strict=True)
            ),
            "block_size": BLOCK_SIZE,
            "block_soap_ms_per_step": 1e3 * blocked.median / FREQUENCY,
            "block_ratio_vs_adamw": statistics.median(
                b / a for b, a in zip(blocked.times, adamw.times, strict=True)
            ),
            "repeats": repeats,
        }
        rows.append(row)
        print(
            f"  d = {d:4d} ({num_params} params): adamw {row['adamw_ms_per_step']:.2f} ms, "
            f"soap {row['soap_ms_per_step']:.2f} ms (x{row['ratio_vs_adamw']:.2f}), "
            f"eigenbasis updates {100 * row['eigenbasis_share']:.0f}%; block_size={BLOCK_SIZE} "
            f"{row['block_soap_ms_per_step']:.2f} ms (x{row['block_ratio_vs_adamw']:.2f})",
            flush=True,
        )
        for runner in runners.values():
            runner.release()
    return rows


def run(settings: Settings) -> list[Row]:
    return measure(QUICK_WIDTHS if settings.quick else WIDTHS, settings.repeats_or(REPEATS))
