"""A byte-level language model with bfloat16 params: where the rounding of updates shows.

The language-model example's decoder (``examples.lm``: its model, corpus and training loop, on
one device; :data:`MODEL`, 4 blocks, d = 64, 0.24M params, the model of ``benchmarks.lm_race``)
learns to predict the next byte of Python's standard-library source (shipped with Python, no
download). Adam with warm-up over the first twentieth of the steps, then cosine decay from 1e-3
to a tenth of it (the example's schedule), batch 32 of 64-byte windows; five settings as in
``benchmarks.mnist_low_precision`` (float32 params; bfloat16 plain, with Kahan summation, with
stochastic rounding, Kahan with 8-bit moments), the same windows for a seed. As in the example
with ``--param-dtype bfloat16``, the model is initialized and computes in its params' dtype.
The last tenth of the text is held out: the final loss is the mean loss on ``EVAL_WINDOWS``
windows evenly spaced over it, which (unlike the last train batches) does not depend on which
windows the last steps drew. Writes per seed the train-loss curve (the mean over each 50 steps)
and the held-out loss to JSON, and plots the curves averaged over seeds::

    python -m benchmarks.lm_low_precision --steps 1000 --seeds 0 1 2 \\
        --out benchmarks/results/lm_low_precision_small.json --plot docs/low_precision_lm_small.png

Runs already in ``--out`` are kept (the command resumes); a file of another model's runs is
refused. ``--peak`` sets the peak rate.
"""

from __future__ import annotations

import argparse
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

from benchmarks.mnist_low_precision import SETTINGS, Setting
from examples.lm.data import Corpus, load
from examples.lm.loop import Run, RunOptions
from examples.lm.model import ModelConfig
from examples.lm.train import Config, Trainer, make_mesh

WINDOW, BATCH, PEAK, AVERAGE_OVER, EVAL_WINDOWS = 64, 32, 1e-3, 50, 512
# The example's ModelConfig settings: 4 blocks, d = 64, 4 heads, 0.24M params.
MODEL: dict[str, int] = {"layers": 4, "d_model": 64, "heads": 4, "seq_len": WINDOW}


def refuse_another_model(out: Path, model: dict[str, int]) -> None:
    """Exits with a message that names ``out`` when it holds the runs of another model."""
    if out.exists() and (saved := json.loads(out.read_text()).get("model")) != model:
        raise SystemExit(
            f"--out {out} holds the runs of another model ({saved}); this study trains "
            f"{model}: give another --out"
        )


def train(
    setting: Setting, steps: int, corpus: Corpus, seed: int = 0, peak: float = PEAK
) -> tuple[list[float], float]:
    """Trains the example's :data:`MODEL` with ``setting`` for ``steps`` steps (a multiple of
    ``AVERAGE_OVER``), its rate peaking at ``peak``: the example's run without files.

    Returns the train loss averaged over each ``AVERAGE_OVER`` steps, and the final loss on
    ``EVAL_WINDOWS`` evenly spaced windows of the held-out last tenth.
    """
    factory, dtype = setting
    config = Config(
        model=ModelConfig(**MODEL, param_dtype=jnp.dtype(dtype).name),
        learning_rate=peak,
        steps=steps,
        batch_size=BATCH,
        eval_every=AVERAGE_OVER,
        eval_windows=EVAL_WINDOWS,
        seed=seed,
    )
    trainer = Trainer(config, make_mesh(None, jax.devices()[:1]), lambda lr: factory(lr, seed))
    records = Run(trainer, corpus, RunOptions()).train()
    return [record["train_loss"] for record in records], records[-1]["held_out_loss"]


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
    corpus = Corpus(load(), WINDOW)
    refuse_another_model(out, MODEL)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for peak in peaks:
        for seed in seeds:
            for name, setting in settings.items():
                runs = _merged(runs, _saved_runs(out, steps))
                if (name, seed, peak) in {_key(r) for r in runs}:
                    continue
                start = time.perf_counter()
                curve, held_out_loss = train(setting, steps, corpus, seed, peak)
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
                    "model": MODEL,
                    "corpus_bytes": len(corpus.train) + len(corpus.held_out),
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
    parser.add_argument("--steps", type=int, default=1000)
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
    parser = arguments(SETTINGS, description, "benchmarks/results/lm_low_precision_small.json")
    parser.add_argument("--plot", default="docs/low_precision_lm_small.png")
    args, runs = study(SETTINGS, "float32", parser, argv, "benchmarks.lm_low_precision")
    plot(runs, args.steps, Path(args.plot))


if __name__ == "__main__":
    main()
