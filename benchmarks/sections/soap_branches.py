"""``soap_branches``: what a branch of the step costs on the backend, and SOAP's step against
AdamW's where its phase is chosen once for the whole tree (issue 50).

SOAP's step has three phases: the first step (which only builds the bases), a plain step, and
a step after which the bases are refreshed. Up to revision f276d9a each leaf chose its phase
with two ``lax.cond`` of its own; since, ``scale_by_soap`` chooses it once a step for the whole
tree (one ``lax.switch``) and every leaf takes that phase's arithmetic as traced. This section
times what that is worth:

* ``cond_us``: one ``lax.cond`` of a step on the backend, over a ``jnp.where`` computing both
  sides: a jitted, donating cycle of ``FREQUENCY`` steps, each passing ``BRANCHES`` small
  arrays (``BRANCH_SIZE`` floats) through a branch of its own, against the same cycle with each
  branch replaced by a selection between both sides; the difference per branch.
* per width, each a cycle of ``FREQUENCY`` optimizer steps on the transformer-like tree of
  ``benchmarks.models`` as in the ``soap`` section, timed in the same rounds (interleaved):
  ``adam_jax.adamw``; ``adam_jax.soap`` (``soap_*``, with ``never_*``: one that never refreshes
  after its first step, whence ``eigenbasis_share``); the setting to use (``practical_*``, the
  ``soap`` section's ``PRACTICAL``; ``practical_never_*``); blocked SOAP with
  ``stagger_refresh`` (``staggered_*``). Ratios are medians over rounds of the runner's time
  over AdamW's in the same round.

Run it from a checkout of an earlier revision's ``adam_jax`` (``PYTHONPATH``, with ``-P``) for
the figures before: the section uses the public API alone.
"""

from __future__ import annotations

import statistics
from typing import Any

import jax
import jax.numpy as jnp

import adam_jax
from benchmarks.harness import LR, Row, Runner, Settings, copy_tree, interleaved
from benchmarks.models import transformer_params
from benchmarks.sections.soap import (
    BLOCK_SIZE,
    FREQUENCY,
    LAYERS,
    NEVER,
    PRACTICAL,
    cycle,
    median_ratio,
)

WIDTHS = (64, 256)
QUICK_WIDTHS = (16,)
REPEATS = 10
BRANCHES = 64
BRANCH_SIZE = 256


def _halved(x: jax.Array) -> jax.Array:
    return x * 0.5


def _grown(x: jax.Array) -> jax.Array:
    return x + 1.0


def branches(arrays: Any, _: Any, state: jax.Array) -> tuple[Any, jax.Array]:
    """``FREQUENCY`` steps, each array through a ``lax.cond`` on its own (data-dependent)
    predicate."""

    def body(_: Any, arrays: Any) -> Any:
        return [jax.lax.cond(x[0] > 0, _halved, _grown, x) for x in arrays]

    return jax.lax.fori_loop(0, FREQUENCY, body, arrays), state


def selections(arrays: Any, _: Any, state: jax.Array) -> tuple[Any, jax.Array]:
    """:func:`branches` with each branch a selection between both sides."""

    def body(_: Any, arrays: Any) -> Any:
        return [jnp.where(x[0] > 0, _halved(x), _grown(x)) for x in arrays]

    return jax.lax.fori_loop(0, FREQUENCY, body, arrays), state


def _share(never: Runner, refreshing: Runner) -> float:
    """The median share of ``refreshing``'s time that its refreshes take."""
    return statistics.median(1 - n / s for n, s in zip(never.times, refreshing.times, strict=True))


def measure_branch(repeats: int) -> Row:
    arrays = [jnp.full((BRANCH_SIZE,), float(i % 3) - 1.0) for i in range(BRANCHES)]
    conds = Runner("branches", branches, copy_tree(arrays), None, jnp.zeros(()))
    selects = Runner("selections", selections, copy_tree(arrays), None, jnp.zeros(()))
    interleaved([conds, selects], repeats)
    per_branch = statistics.median(
        (c - s) / (BRANCHES * FREQUENCY) for c, s in zip(conds.times, selects.times, strict=True)
    )
    row = {
        "tree": f"{BRANCHES} arrays of {BRANCH_SIZE} floats",
        "cond_us": 1e6 * per_branch,
        "cycle_with_conds_ms": 1e3 * conds.median,
        "cycle_with_selections_ms": 1e3 * selects.median,
        "repeats": repeats,
    }
    print(
        f"  a lax.cond costs {row['cond_us']:.1f} us over a selection "
        f"({row['cycle_with_conds_ms']:.2f} against {row['cycle_with_selections_ms']:.2f} ms "
        f"for {FREQUENCY} x {BRANCHES})",
        flush=True,
    )
    return row


def measure_soap(
    d: int, repeats: int, layers: int = LAYERS, names: tuple[str, ...] | None = None
) -> Row:
    """The row of width ``d``; ``names``: the runners to time besides AdamW (all by default:
    ``soap``, ``never``, ``practical``, ``practical_never``, ``staggered``)."""
    params = transformer_params(jax.random.key(0), layers=layers, d=d, ff=4 * d, seq=64)
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) * 1e-2, params)
    candidates = {
        "adamw": adam_jax.adamw(LR),
        "soap": adam_jax.soap(LR, precondition_frequency=FREQUENCY),
        "never": adam_jax.soap(LR, precondition_frequency=NEVER),
        "practical": adam_jax.soap(LR, precondition_frequency=FREQUENCY, **PRACTICAL),
        "practical_never": adam_jax.soap(LR, precondition_frequency=NEVER, **PRACTICAL),
        "staggered": adam_jax.soap(
            LR, precondition_frequency=FREQUENCY, block_size=BLOCK_SIZE, stagger_refresh=True
        ),
    }
    runners = {
        name: Runner(name, cycle(tx), copy_tree(params), grads, tx.init(params))
        for name, tx in candidates.items()
        if name == "adamw" or names is None or name in names
    }
    interleaved(list(runners.values()), repeats)
    adamw = runners["adamw"]
    row: Row = {
        "tree": f"transformer-like, d = {d}",
        "num_params": sum(p.size for p in jax.tree.leaves(params)),
        "leaves": len(jax.tree.leaves(params)),
        "precondition_frequency": FREQUENCY,
        "adamw_ms_per_step": 1e3 * adamw.median / FREQUENCY,
    }
    timed = [name for name in runners if name != "adamw"]
    for name in timed:
        row[f"{name}_ms_per_step"] = 1e3 * runners[name].median / FREQUENCY
        row[f"{name}_ratio_vs_adamw"] = median_ratio(runners[name], adamw)
    if {"never", "soap"} <= set(runners):
        row["eigenbasis_share"] = _share(runners["never"], runners["soap"])
    if {"practical_never", "practical"} <= set(runners):
        row["practical_eigenbasis_share"] = _share(runners["practical_never"], runners["practical"])
    row["repeats"] = repeats
    ratios = ", ".join(f"{name} x{row[f'{name}_ratio_vs_adamw']:.2f}" for name in timed)
    print(
        f"  d = {d:4d} ({row['num_params']} params, {row['leaves']} leaves): adamw "
        f"{row['adamw_ms_per_step']:.2f} ms; {ratios}",
        flush=True,
    )
    for runner in runners.values():
        runner.release()
    return row


def run(settings: Settings) -> list[Row]:
    repeats = settings.repeats_or(REPEATS)
    settings.finished.append(measure_branch(repeats))
    for d in QUICK_WIDTHS if settings.quick else WIDTHS:
        settings.finished.append(measure_soap(d, repeats))
    return list(settings.finished)
