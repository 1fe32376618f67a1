"""A byte-level language model with bfloat16 params: where the rounding of updates shows.

The benchmarks' transformer-like model (``benchmarks.models.transformer_params``, 4 blocks,
d = 64, vocabulary of the 256 byte values) learns to predict the next byte of text that ships
with Python: the source of the standard library modules in ``MODULES`` (the same bytes for a
given Python version, no download). Adam with warm-up and cosine decay from 1e-3, batch 32 of
64-byte windows; five settings as in ``benchmarks.mnist_low_precision`` (float32 params;
bfloat16 plain, with Kahan summation, with stochastic rounding, Kahan with 8-bit moments), the
same init (rounded) and windows for a seed; the forward and backward passes compute in float32.
The last tenth of the text is held out: the final loss is the mean loss on ``EVAL_WINDOWS``
fixed windows of it, which (unlike the last train batches) does not depend on which windows
the last steps drew. Writes per seed the train-loss curve (the mean over each 50 steps) and the
held-out loss to JSON, and plots the curves averaged over seeds::

    python -m benchmarks.lm_low_precision --steps 2000 --seeds 0 1 2 \\
        --out benchmarks/results/lm_low_precision.json --plot docs/low_precision_lm.png

Runs already in ``--out`` are kept (the command resumes); ``--peak`` sets the peak rate.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.mnist_low_precision import SETTINGS, Setting
from benchmarks.models import transformer_loss, transformer_params

MODULES = ("argparse", "inspect", "typing", "dataclasses", "pathlib", "json.decoder", "textwrap")
WINDOW, BATCH, PEAK, AVERAGE_OVER, EVAL_WINDOWS = 64, 32, 1e-3, 50, 512


def corpus() -> np.ndarray:
    """The bytes of the standard library modules ``MODULES``, concatenated."""
    import importlib

    text = "\n".join(inspect.getsource(importlib.import_module(name)) for name in MODULES)
    return np.frombuffer(text.encode(), np.uint8)


def train(
    setting: Setting, steps: int, data: np.ndarray, seed: int = 0, peak: float = PEAK
) -> tuple[list[float], float]:
    """Train ``setting`` for ``steps`` steps on the first nine tenths of ``data``, the
    learning rate warming up to ``peak`` over the first twentieth of the steps.

    Returns the train loss averaged over each ``AVERAGE_OVER`` steps, and the final loss on
    ``EVAL_WINDOWS`` evenly spaced windows of the held-out last tenth.
    """
    factory, dtype = setting
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, steps // 20, steps)
    tx = factory(schedule, seed)
    params = transformer_params(jax.random.key(seed), layers=4, seq=WINDOW)
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    state = tx.init(params)
    split = len(data) * 9 // 10
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, split - WINDOW - 1, (steps, BATCH))
    held_out = np.linspace(split, len(data) - WINDOW - 1, EVAL_WINDOWS).astype(np.int64)
    windows = jnp.asarray(data)

    def batch(begin: jax.Array) -> jax.Array:
        return windows[begin[:, None] + jnp.arange(WINDOW + 1)].astype(jnp.int32)

    def loss_fn(params: Any, tokens: jax.Array) -> jax.Array:
        return transformer_loss(jax.tree.map(lambda p: p.astype(jnp.float32), params), tokens)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params: Any, state: Any, begin: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch(begin))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for begin in starts:
        params, state, loss = step(params, state, jnp.asarray(begin))
        losses.append(loss)
    per_step = np.asarray(jax.device_get(losses), np.float64)
    final = float(jax.jit(loss_fn)(params, batch(jnp.asarray(held_out))))
    return per_step.reshape(-1, AVERAGE_OVER).mean(axis=1).tolist(), final


def plot(runs: list[dict[str, Any]], steps: int, path: Path) -> None:
    """The train-loss curves of each setting, averaged over the seeds in ``runs``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for name in SETTINGS:
        curves = np.array([r["curve"] for r in runs if r["setting"] == name])
        if not len(curves):
            continue
        x = (np.arange(curves.shape[1]) + 1) * AVERAGE_OVER
        ax.plot(x, curves.mean(axis=0), label=name, linestyle="--" if "8-bit" in name else "-")
    seeds = len({r["seed"] for r in runs})
    ax.set(
        xlabel="step",
        ylabel=f"train loss (nats per byte, mean of {AVERAGE_OVER} steps)",
        yscale="log",
        title=f"byte-level transformer on Python's standard library\n{steps} Adam steps, "
        f"mean of {seeds} seeds",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _rate(run_: dict[str, Any]) -> float:
    return run_.get("peak_learning_rate", PEAK)


def table(runs: list[dict[str, Any]], settings: dict[str, Setting], baseline: str) -> str:
    """The markdown table: per setting and peak rate, the mean held-out loss over seeds and its
    difference from the baseline's at the baseline's best rate (the lowest mean among its rates
    with the most seeds)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in sorted(runs, key=lambda r: (_rate(r), r["seed"])):
        groups.setdefault((r["setting"], _rate(r)), []).append(r)
    means = {
        key: float(np.mean([r["held_out_loss"] for r in group])) for key, group in groups.items()
    }
    ours = [key for key in groups if key[0] == baseline]
    most = max((len(groups[key]) for key in ours), default=0)
    best = min((key for key in ours if len(groups[key]) == most), key=means.get, default=None)
    versus_name = f"{baseline} at {best[1]:g}" if best else baseline
    lines = [
        f"| setting | peak rate | seeds | held-out loss, mean | per seed | vs {versus_name} |",
        "|---|---|---|---|---|---|",
    ]
    for name in settings:
        for key in sorted(key for key in groups if key[0] == name):
            versus = (
                ""
                if best is None or key == best
                else f"{100 * (means[key] / means[best] - 1):+.2f}%"
            )
            per_seed = ", ".join(f"{r['held_out_loss']:.4f}" for r in groups[key])
            lines.append(
                f"| {name} | {key[1]:g} | {len(groups[key])} | {means[key]:.4f} | {per_seed} "
                f"| {versus} |"
            )
    return "\n".join(lines)


def _saved_runs(out: Path, steps: int) -> list[dict[str, Any]]:
    """The runs of ``steps`` steps in ``out``, each with its peak rate."""
    saved = json.loads(out.read_text()) if out.exists() else {}
    if saved.get("steps") != steps:
        return []
    default = saved.get("peak_learning_rate", PEAK)  # files of one rate name it once
    return [{"peak_learning_rate": default, **r} for r in saved.get("runs", [])]


def _key(run_: dict[str, Any]) -> tuple[str, int, float]:
    return run_["setting"], run_["seed"], _rate(run_)


def _merged(mine: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``mine`` and the runs of ``theirs`` for other (setting, seed, peak rate) triples."""
    done = {_key(r) for r in mine}
    return mine + [r for r in theirs if _key(r) not in done]


def _write_atomically(out: Path, record: dict[str, Any]) -> None:
    """Replaces ``out`` with ``record``: a crash leaves the old file or the new one."""
    with tempfile.NamedTemporaryFile("w", dir=out.parent, suffix=".tmp", delete=False) as f:
        f.write(json.dumps(record, indent=1))
    os.replace(f.name, out)


def run(
    settings: dict[str, Setting],
    seeds: list[int],
    steps: int,
    out: Path,
    command: str,
    peaks: tuple[float, ...] = (PEAK,),
) -> list[dict[str, Any]]:
    """Trains each setting for each seed and peak rate, skipping the runs of ``steps`` steps
    already in ``out``, and writes ``out`` (with ``command``) after each run; returns all of
    its runs. Processes that share ``out`` (one per seed, say) keep each other's runs."""
    data = corpus()
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for peak in peaks:
        for seed in seeds:
            for name, setting in settings.items():
                runs = _merged(runs, _saved_runs(out, steps))
                if (name, seed, peak) in {_key(r) for r in runs}:
                    continue
                start = time.perf_counter()
                curve, held_out_loss = train(setting, steps, data, seed, peak)
                runs.append(
                    {
                        "setting": name,
                        "seed": seed,
                        "peak_learning_rate": peak,
                        "held_out_loss": held_out_loss,
                        "seconds": time.perf_counter() - start,
                        "curve": curve,
                    }
                )
                print(
                    f"peak {peak:g} seed {seed} {name:38s} held-out loss {held_out_loss:.4f}",
                    flush=True,
                )
                runs = _merged(runs, _saved_runs(out, steps))
                record = {
                    "command": command,
                    "python": sys.version.split()[0],
                    "corpus_bytes": len(data),
                    "steps": steps,
                    "runs": runs,
                }
                _write_atomically(out, record)  # each run, as it ends
    return _merged(runs, _saved_runs(out, steps))


def arguments(
    settings: dict[str, Setting], description: str, default_out: str
) -> argparse.ArgumentParser:
    """The options of a language-model study of ``settings``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument(
        "--peak",
        type=float,
        nargs="+",
        default=[PEAK],
        help=f"the peak learning rate, or several for a sweep (default {PEAK})",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=default_out)
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=list(settings),
        default=list(settings),
        metavar="NAME",
        help="a subset of the settings to run (default: all); quote names with spaces",
    )
    return parser


def study(
    settings: dict[str, Setting],
    baseline: str,
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    module: str,
) -> tuple[argparse.Namespace, list[dict[str, Any]]]:
    """Parses ``argv`` with ``parser`` (from :func:`arguments`), runs the chosen settings and
    prints the table; returns the options and the runs."""
    args = parser.parse_args(argv)
    if args.steps < AVERAGE_OVER or args.steps % AVERAGE_OVER:
        parser.error(f"--steps must be a positive multiple of {AVERAGE_OVER}, got {args.steps}")
    if not all(peak > 0 for peak in args.peak):
        parser.error(f"--peak takes learning rates > 0, got {args.peak}")
    command = f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)
    chosen = {name: setting for name, setting in settings.items() if name in args.settings}
    runs = run(chosen, args.seeds, args.steps, Path(args.out), command, tuple(args.peak))
    print(table(runs, settings, baseline))
    return args, runs


def main(argv: list[str] | None = None) -> None:
    description = __doc__.splitlines()[0]
    parser = arguments(SETTINGS, description, "benchmarks/results/lm_low_precision.json")
    parser.add_argument("--plot", default="docs/low_precision_lm.png")
    args, runs = study(SETTINGS, "float32", parser, argv, "benchmarks.lm_low_precision")
    plot(runs, args.steps, Path(args.plot))


if __name__ == "__main__":
    main()
