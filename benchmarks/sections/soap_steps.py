"""``soap_steps``: how evenly blocked SOAP's refresh work falls over its steps, with
``stagger_refresh`` and without (issue 33, item 3).

Without it every block refreshes its eigenbases after the same step, one in
``precondition_frequency``, and that step carries the whole refresh; with it, each block at its
own offset in the window, so every step refreshes about ``1 / precondition_frequency`` of
them. Each runner is one jitted, donating step (update + apply) of ``adam_jax.soap`` with
``block_size=BLOCK_SIZE`` on the transformer-like tree of ``benchmarks.models``, in float32 and
with the compressed storages of the ``soap`` section, each with and without staggering; the
four take their steps in the same rounds (interleaved), every step timed alone.

Per runner: ``worst_window_ratio``, the largest over every ``FREQUENCY`` consecutive steps of
their slowest step over their median (the issue's goal: at most 1.5 with staggering);
``median_ms`` and ``mean_ms`` over all timed steps (the refresh work moved, not removed: the
means stay near each other); ``mean_ratio_vs_adamw``, the mean step over that of
``adam_jax.adamw``, timed in the same rounds.
"""

from __future__ import annotations

import statistics
from typing import Any

import jax
import jax.numpy as jnp

import adam_jax
from benchmarks.harness import LR, Row, Runner, Settings, adam_step, copy_tree, interleaved
from benchmarks.models import transformer_params
from benchmarks.sections.soap import BLOCK_SIZE, COMPRESSED, FREQUENCY, LAYERS

WIDTH = 256
QUICK_WIDTH = 16
WINDOWS = 3  # timed steps: WINDOWS * FREQUENCY, after two warm-up steps (the first initializes)


def worst_window_ratio(times: list[float], window: int) -> float:
    """The largest, over every ``window`` consecutive steps, of their slowest over their median."""
    spans = [times[i : i + window] for i in range(len(times) - window + 1)]
    return max(max(span) / statistics.median(span) for span in spans)


def measure(d: int, windows: int, layers: int = LAYERS) -> list[Row]:
    params = transformer_params(jax.random.key(0), layers=layers, d=d, ff=4 * d, seq=64)
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) * 1e-2, params)
    num_params = sum(p.size for p in jax.tree.leaves(params))
    settings: dict[str, dict[str, Any]] = {
        "float32": {"block_size": BLOCK_SIZE},
        "compressed": COMPRESSED,
    }
    runs = []
    for setting, options in settings.items():
        for stagger in (False, True):
            tx = adam_jax.soap(
                LR, precondition_frequency=FREQUENCY, stagger_refresh=stagger, **options
            )
            name = f"{setting}, stagger_refresh={stagger}"
            runner = Runner(name, adam_step(tx), copy_tree(params), grads, tx.init(params))
            runs.append((setting, stagger, runner))
    adamw_tx = adam_jax.adamw(LR)
    adamw = Runner("adamw", adam_step(adamw_tx), copy_tree(params), grads, adamw_tx.init(params))
    interleaved([runner for _, _, runner in runs] + [adamw], windows * FREQUENCY)
    adamw_mean = statistics.mean(adamw.times)
    rows = []
    for setting, stagger, runner in runs:
        row = {
            "tree": f"transformer-like, d = {d}",
            "num_params": num_params,
            "setting": setting,
            "stagger_refresh": stagger,
            "block_size": BLOCK_SIZE,
            "precondition_frequency": FREQUENCY,
            "steps": len(runner.times),
            "worst_window_ratio": worst_window_ratio(runner.times, FREQUENCY),
            "median_ms": 1e3 * runner.median,
            "mean_ms": 1e3 * statistics.mean(runner.times),
            "mean_ratio_vs_adamw": statistics.mean(runner.times) / adamw_mean,
        }
        rows.append(row)
        print(
            f"  d = {d} {runner.name}: slowest / median step over {FREQUENCY} steps at most "
            f"{row['worst_window_ratio']:.2f}, median {row['median_ms']:.1f} ms, "
            f"mean {row['mean_ms']:.1f} ms ({row['mean_ratio_vs_adamw']:.2f}x AdamW's)",
            flush=True,
        )
        runner.release()
    adamw.release()
    return rows


def run(settings: Settings) -> list[Row]:
    if settings.quick:
        return measure(QUICK_WIDTH, 1, layers=0)
    return measure(WIDTH, settings.repeats_or(WINDOWS))
