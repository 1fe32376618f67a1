"""A language-model race: steps and seconds each optimizer takes to AdamW's held-out loss.

The language-model example's decoder, corpus and training loop (``examples.lm``: ``--model small``,
4 blocks, d = 64, 4 heads, 0.24M parameters; ``medium``, 6 blocks, d = 256, 4.9M) on the source of
Python's standard library, windows of 64 bytes, batches of 32, the held-out last tenth; every
optimizer with warm-up over the first twentieth of the steps and cosine decay from its peak rate to
a tenth of it, weight decay 0.01 on the matrices, on one device. Tuning: each optimizer's peak rate
over its grid (``GRIDS``, at least four rates) on seed 0; then ``--seeds`` at the best rate (the
compressed SOAP settings at float32 SOAP's best rate alone: they measure what the storages cost in
loss). Every ``EVAL_EVERY`` steps a run records its loss on the held-out windows and the seconds its
training steps have taken so far (compiled ahead, timed between evaluations, evaluations not
counted). The report gives, per optimizer at its best rate and over the seeds: the final held-out
loss; the steps and seconds to reach AdamW's final held-out loss (the mean over its seeds; linear
between evaluations) and their ratio to AdamW's; the step time; the optimizer state's bytes per
parameter. It writes JSON (resumable: the runs already in ``--out`` are kept, processes may share
it) and a plot of the held-out loss against steps and against seconds::

    python -m benchmarks.lm_race --steps 1000 --optimizers adamw soap --model small \\
        --out benchmarks/results/lm_race_small.json --plot docs/lm_race_small.png

``--quick`` is a smoke test (a one-block model, a few steps, two rates, one seed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax
from benchmarks.lm_low_precision import (
    BATCH,
    EVAL_WINDOWS,
    MODEL,
    WINDOW,
    _merged,
    _saved_runs,
    _write_atomically,
    refuse_another_model,
)
from benchmarks.lm_memory import WEIGHT_DECAY, matrices
from benchmarks.sections.soap import COMPRESSED, PRACTICAL
from examples.lm.data import Corpus, load
from examples.lm.loop import Run, RunOptions, state_bytes_per_param
from examples.lm.model import ModelConfig
from examples.lm.train import Config, OptimizerFactory, Trainer, make_mesh

EVAL_EVERY = 50
# Steps per optimizer and round when the steps are timed side by side: SOAP's eigenbases are
# refreshed once in ten steps at its default precondition_frequency.
TIMED_STEPS = 10
BASELINE = "adamw"
# a measure -> the name of its ratio to AdamW's
RATIOS = {
    "steps_to_target": "steps_ratio",
    "seconds_to_target": "seconds_ratio",
    "step_ms": "step_ratio",
}


def hidden_matrices(params: Any) -> Any:
    """The leaves Muon takes: the blocks' matrices (embeddings and the output head stay with
    AdamW, as in Muon's recipe)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: path[0] == jax.tree_util.DictKey("blocks") and p.ndim == 2, params
    )


def muon_with_adamw(
    learning_rate: optax.ScalarOrSchedule, weight_decay: float = WEIGHT_DECAY
) -> optax.GradientTransformation:
    """Muon (``optax.contrib.muon``) for the hidden matrices, ``adam_jax.adamw`` for the rest.

    Muon's updates are scaled to an RMS of 0.2 per matrix (``consistent_rms``, Liu et al.,
    2025), about AdamW's, so one learning rate serves both.
    """

    def labels(params: Any) -> Any:
        return jax.tree.map(lambda m: "muon" if m else "adamw", hidden_matrices(params))

    return optax.partition(
        {
            "muon": optax.contrib.muon(
                learning_rate, weight_decay=weight_decay, consistent_rms=0.2
            ),
            "adamw": adam_jax.adamw(
                learning_rate, b2=0.95, weight_decay=weight_decay, mask=matrices
            ),
        },
        labels,
    )


# name -> the optimizer at a learning rate (schedule)
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adamw": lambda lr: adam_jax.adamw(lr, b2=0.95, weight_decay=WEIGHT_DECAY, mask=matrices),
    "soap": lambda lr: adam_jax.soap(lr, weight_decay=WEIGHT_DECAY, mask=matrices),
    # The setting that keeps GPT-2 small's SOAP state under 12 bytes a parameter (blocks of
    # 128, bfloat16 factors and bases, 8-bit moments), its bases rectified and not.
    "soap, compressed": lambda lr: adam_jax.soap(
        lr, weight_decay=WEIGHT_DECAY, mask=matrices, **COMPRESSED
    ),
    "soap, compressed, unrectified": lambda lr: adam_jax.soap(
        lr, weight_decay=WEIGHT_DECAY, mask=matrices, basis_rectification=0, **COMPRESSED
    ),
    # One of the compressed setting's 8-bit moments kept in bfloat16 instead (about one byte a
    # parameter more: 11.0 at GPT-2 small's shapes).
    "soap, compressed, bfloat16 mu": lambda lr: adam_jax.soap(
        lr, weight_decay=WEIGHT_DECAY, mask=matrices, **{**COMPRESSED, "mu_dtype": jnp.bfloat16}
    ),
    "soap, compressed, bfloat16 nu": lambda lr: adam_jax.soap(
        lr, weight_decay=WEIGHT_DECAY, mask=matrices, **{**COMPRESSED, "nu_dtype": jnp.bfloat16}
    ),
    "soap, compressed, bfloat16 nu, unrectified": lambda lr: adam_jax.soap(
        lr, weight_decay=WEIGHT_DECAY, mask=matrices, **PRACTICAL
    ),
    # The compressed setting's parts apart: blocks alone, then bfloat16 factors and bases.
    "soap, blocks": lambda lr: adam_jax.soap(
        lr, weight_decay=WEIGHT_DECAY, mask=matrices, block_size=COMPRESSED["block_size"]
    ),
    "soap, blocks, bfloat16": lambda lr: adam_jax.soap(
        lr,
        weight_decay=WEIGHT_DECAY,
        mask=matrices,
        **{k: COMPRESSED[k] for k in ("block_size", "factor_dtype", "basis_dtype")},
    ),
    # The GPU's default orthogonalization (Cholesky QR) on the CPU, where QR is the default:
    # what a GPU user's SOAP and setting to use learn (issue 50).
    "soap, cholesky QR": lambda lr: adam_jax.soap(
        lr, weight_decay=WEIGHT_DECAY, mask=matrices, orthogonalization="cholesky_qr"
    ),
    "soap, compressed, bfloat16 nu, unrectified, cholesky QR": lambda lr: adam_jax.soap(
        lr, weight_decay=WEIGHT_DECAY, mask=matrices, orthogonalization="cholesky_qr", **PRACTICAL
    ),
    # The first step's bases by a refresh of the identity, not eigh (what a TPU compiles fast).
    "soap, power start": lambda lr: adam_jax.soap(
        lr, weight_decay=WEIGHT_DECAY, mask=matrices, first_basis="power"
    ),
    "muon + adamw": muon_with_adamw,
    # LaProp's decay is not multiplied by the rate (its authors'): the schedule times AdamW's
    # coefficient decays the params as AdamW's does.
    "laprop": lambda lr: adam_jax.laprop(
        lr, b2=0.95, weight_decay=lambda count: WEIGHT_DECAY * lr(count), mask=matrices
    ),
    "grams": lambda lr: adam_jax.grams(lr, b2=0.95, weight_decay=WEIGHT_DECAY, mask=matrices),
    "mars": lambda lr: adam_jax.mars(lr, weight_decay=WEIGHT_DECAY, mask=matrices),
    "adam-mini": lambda lr: adam_jax.adam_mini(
        lr, b2=0.95, weight_decay=WEIGHT_DECAY, mask=matrices, num_heads=4
    ),
}
# name -> the peak rates tried on seed 0 (factors of two around the rates that papers and
# benchmarks.lm_memory found for models of this size)
GRIDS: dict[str, tuple[float, ...]] = {
    "adamw": (2e-3, 4e-3, 8e-3, 1.6e-2),
    "soap": (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2),
    # At float32 SOAP's best rate: the storages' cost in loss, not their own tuning.
    "soap, compressed": (1.6e-2,),
    "soap, compressed, unrectified": (1.6e-2,),
    "soap, compressed, bfloat16 mu": (1.6e-2,),
    "soap, compressed, bfloat16 nu": (1.6e-2,),
    "soap, compressed, bfloat16 nu, unrectified": (1.6e-2,),
    "soap, blocks": (1.6e-2,),
    "soap, blocks, bfloat16": (1.6e-2,),
    "soap, cholesky QR": (1.6e-2,),
    "soap, compressed, bfloat16 nu, unrectified, cholesky QR": (1.6e-2,),
    "soap, power start": (1.6e-2,),
    "muon + adamw": (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2),
    "laprop": (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2),
    # Grams was best at 3.2e-2, the top of the others' grid, on both models: one more above.
    "grams": (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2),
    "mars": (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2),
    "adam-mini": (4e-3, 8e-3, 1.6e-2, 3.2e-2),
}
# --model medium: grids of its own where the small model's do not fit it (20x the params:
# lower rates for AdamW; the setting to use for SOAP tuned, not run at float32 SOAP's rate).
# Each ends one doubling above its best rate, where seed 0 was already clearly worse (AdamW
# 4e-3: 1.944 against 1.501; SOAP 8e-3: 1.318 against 1.285): the next doubling was dropped.
MEDIUM_GRIDS: dict[str, tuple[float, ...]] = {
    "adamw": (1e-3, 2e-3, 4e-3),
    "soap, compressed, bfloat16 nu, unrectified": (2e-3, 4e-3, 8e-3),
}
# --model: the example's ModelConfig settings (windows of WINDOW bytes)
MODELS: dict[str, dict[str, int]] = {
    "small": MODEL,  # 0.24M params, the model of the other language-model studies
    "medium": {"layers": 6, "d_model": 256, "heads": 8, "seq_len": WINDOW},  # 4.9M params
}
QUICK_MODEL = {"layers": 1, "d_model": 32, "heads": 2, "seq_len": WINDOW}


def run_config(name: str, steps: int, seed: int, peak: float, model: dict[str, int]) -> Config:
    """The language-model example's settings for a run of ``name`` at ``peak``: the model of
    ``model`` (:data:`MODELS`), warm-up over the first twentieth of the steps then cosine decay
    to a tenth of the peak, one device."""
    return Config(
        model=ModelConfig(**model),
        optimizer=name,
        learning_rate=peak,
        steps=steps,
        batch_size=BATCH,
        eval_every=EVAL_EVERY,
        eval_windows=EVAL_WINDOWS,
        seed=seed,
    )


def trainer(name: str, config: Config) -> Trainer:
    """The example's trainer of ``config`` with the racer ``name`` of :data:`OPTIMIZERS`, on
    the first device."""
    return Trainer(config, make_mesh(None, jax.devices()[:1]), OPTIMIZERS[name])


def train(
    name: str, steps: int, corpus: Corpus, seed: int, peak: float, model: dict[str, int]
) -> dict[str, Any]:
    """Trains with ``name`` at ``peak`` for ``steps`` steps (a multiple of ``EVAL_EVERY``): the
    example's run (:class:`examples.lm.loop.Run`) without files.

    Returns the held-out loss and the training seconds at step 0 and every ``EVAL_EVERY``
    steps, the seconds of each span of ``EVAL_EVERY`` steps, and the state's bytes per param.
    """
    run_ = Run(trainer(name, run_config(name, steps, seed, peak, model)), corpus, RunOptions())
    first = run_.trainer.loss(run_.held_out)
    records = run_.train()
    tokens = EVAL_EVERY * BATCH * WINDOW
    spans = [tokens / record["tokens_per_second"] for record in records]
    return {
        "held_out_losses": [first] + [record["held_out_loss"] for record in records],
        "seconds": np.cumsum([0.0, *spans]).tolist(),
        "span_seconds": spans,
        "state_bytes_per_param": state_bytes_per_param(run_.trainer),
        "num_params": run_.trainer.param_count,
    }


def step_times(
    rates: dict[str, float], corpus: Corpus, model: dict[str, int], rounds: int
) -> dict[str, float]:
    """Milliseconds per training step of each optimizer at its rate in ``rates``, timed in the
    same rounds (each optimizer ``TIMED_STEPS`` steps a round, the order rotating each round:
    load on the machine hits them alike); the median over rounds."""
    steps = TIMED_STEPS * (rounds + 1)
    runs = {
        name: trainer(name, run_config(name, steps, 0, rate, model)) for name, rate in rates.items()
    }
    starts = corpus.batches(0, steps, BATCH)
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(rounds + 1):  # the first round warms up
        k = round_ % len(names)
        for name in names[k:] + names[:k]:
            begin = time.perf_counter()
            for i in range(round_ * TIMED_STEPS, (round_ + 1) * TIMED_STEPS):
                runs[name].step(corpus.windows(starts[i]))
            runs[name].take_loss_sum()  # waits for the steps
            if round_:
                times[name].append(1e3 * (time.perf_counter() - begin) / TIMED_STEPS)
    return {name: statistics.median(t) for name, t in times.items()}


def _rate(run_: dict[str, Any]) -> float:
    return float(run_["peak_learning_rate"])


def best_rates(runs: list[dict[str, Any]], tuning_seed: int) -> dict[str, float]:
    """Per optimizer, the peak rate of the lowest final held-out loss on ``tuning_seed``."""
    best: dict[str, tuple[float, float]] = {}
    for r in runs:
        if r["seed"] == tuning_seed:
            final = r["held_out_losses"][-1]
            if r["setting"] not in best or final < best[r["setting"]][0]:
                best[r["setting"]] = (final, _rate(r))
    return {name: rate for name, (_, rate) in best.items()}


def crossing(losses: list[float], clock: list[float], target: float) -> float | None:
    """Where ``losses`` (sampled at ``clock``) first reach ``target``, linear between samples;
    None if they never do."""
    for i in range(1, len(losses)):
        if losses[i] <= target:
            before, after = losses[i - 1], losses[i]
            share = 1.0 if before == after else (before - target) / (before - after)
            return clock[i - 1] + min(max(share, 0.0), 1.0) * (clock[i] - clock[i - 1])
    return None


def summary(
    runs: list[dict[str, Any]],
    seeds: list[int],
    tuning_seed: int,
    timed_ms: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Per optimizer at its best rate, over ``seeds``: the mean held-out curve and seconds,
    the final loss, steps and seconds to AdamW's mean final loss, step time, bytes per param.

    With ``timed_ms`` (:func:`step_times`), the step time and the seconds are those of the
    steps timed side by side; without, the runs' own (each run timed alone, under whatever
    load the machine had then)."""
    rates = best_rates(runs, tuning_seed)
    finals: dict[str, Any] = {}
    for name, rate in rates.items():
        mine = [r for r in runs if r["setting"] == name and _rate(r) == rate and r["seed"] in seeds]
        if not mine:
            continue
        losses = np.mean([r["held_out_losses"] for r in mine], axis=0).tolist()
        seconds = np.mean([r["seconds"] for r in mine], axis=0).tolist()
        spans = [s for r in mine for s in r["span_seconds"]]
        step_ms = 1e3 * statistics.median(spans) / EVAL_EVERY
        if timed_ms and name in timed_ms:
            step_ms = timed_ms[name]
            seconds = [i * EVAL_EVERY * step_ms / 1e3 for i in range(len(losses))]
        finals[name] = {
            "peak_learning_rate": rate,
            "seeds": sorted(r["seed"] for r in mine),
            "held_out_losses": losses,
            "seconds": seconds,
            "final_held_out_loss": losses[-1],
            "final_per_seed": [r["held_out_losses"][-1] for r in mine],
            "curves_per_seed": {r["seed"]: r["held_out_losses"] for r in mine},
            "step_ms": step_ms,
            "step_ms_timed_side_by_side": bool(timed_ms and name in timed_ms),
            "state_bytes_per_param": mine[0]["state_bytes_per_param"],
            "grid": {
                f"{_rate(r):g}": r["held_out_losses"][-1]
                for r in sorted(runs, key=_rate)
                if r["setting"] == name and r["seed"] == tuning_seed
            },
        }
    if BASELINE not in finals:
        return finals
    target = finals[BASELINE]["final_held_out_loss"]
    baseline_finals = {
        seed: curve[-1] for seed, curve in finals[BASELINE]["curves_per_seed"].items()
    }
    for entry in finals.values():
        steps = list(range(0, EVAL_EVERY * len(entry["held_out_losses"]), EVAL_EVERY))
        entry["steps_to_target"] = crossing(entry["held_out_losses"], steps, target)
        # Paired: each seed's steps to AdamW's final loss on that seed (same init and batches).
        entry["steps_to_target_per_seed"] = [
            crossing(curve, steps, baseline_finals[seed])
            for seed, curve in entry["curves_per_seed"].items()
            if seed in baseline_finals
        ]
    for entry in finals.values():
        del entry["curves_per_seed"]
        entry["seconds_to_target"] = crossing(entry["held_out_losses"], entry["seconds"], target)
    for entry in finals.values():
        for key, ratio in RATIOS.items():
            ours, theirs = entry.get(key), finals[BASELINE].get(key)
            entry[ratio] = None if ours is None or not theirs else ours / theirs
    return finals


def table(finals: dict[str, Any]) -> str:
    """The markdown table of docs/lm_race.md."""
    target = finals.get(BASELINE, {}).get("final_held_out_loss")
    lines = [
        "| optimizer | seed-0 grid: peak rate (held-out loss) | best | held-out loss, mean "
        f"(per seed) | steps to {target or float('nan'):.4f} (vs AdamW; per seed, to AdamW's "
        "loss on that seed) "
        "| seconds to it (vs AdamW) | step ms (vs AdamW) | state bytes/param |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def with_ratio(value: float | None, ratio: float | None, fmt: str) -> str:
        if value is None:
            return "not reached"
        return f"{value:{fmt}}" + ("" if ratio is None else f" ({ratio:.2f}x)")

    def per_seed(values: list[float | None], fmt: str) -> str:
        return ", ".join("-" if v is None else f"{v:{fmt}}" for v in values)

    for name, e in finals.items():
        grid = ", ".join(f"{rate} ({loss:.4f})" for rate, loss in e["grid"].items())
        steps = with_ratio(e.get("steps_to_target"), e.get("steps_ratio"), ".0f")
        if "steps_to_target_per_seed" in e:
            steps += f"; {per_seed(e['steps_to_target_per_seed'], '.0f')}"
        lines.append(
            f"| {name} | {grid} | {e['peak_learning_rate']:g} "
            f"| {e['final_held_out_loss']:.4f} ({per_seed(e['final_per_seed'], '.4f')}) "
            f"| {steps} "
            f"| {with_ratio(e.get('seconds_to_target'), e.get('seconds_ratio'), '.1f')} "
            f"| {with_ratio(e['step_ms'], e.get('step_ratio'), '.1f')} "
            f"| {e['state_bytes_per_param']:.2f} |"
        )
    return "\n".join(lines)


def plot(finals: dict[str, Any], steps: int, path: Path) -> None:
    """The held-out loss of each optimizer at its best rate (mean over seeds) against steps
    and against training seconds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    by_steps, by_seconds = fig.subplots(1, 2, sharey=True)
    for name, e in finals.items():
        label = f"{name} ({e['peak_learning_rate']:g}, {len(e['seeds'])} seeds)"
        x = np.arange(len(e["held_out_losses"])) * EVAL_EVERY
        by_steps.plot(x[1:], e["held_out_losses"][1:], label=label)
        by_seconds.plot(e["seconds"][1:], e["held_out_losses"][1:], label=label)
    target = finals.get(BASELINE, {}).get("final_held_out_loss")
    for ax, xlabel in (
        (by_steps, "step"),
        (by_seconds, "training seconds (this CPU, steps timed side by side)"),
    ):
        if target is not None:
            ax.axhline(target, color="gray", linestyle=":", linewidth=1)
        ax.set(xlabel=xlabel, yscale="log")
        ax.grid(alpha=0.3)
    by_steps.set(ylabel="held-out loss (nats per byte)")
    by_steps.legend()
    fig.suptitle(f"byte-level transformer on Python's standard library, {steps} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def race(
    names: list[str],
    seeds: list[int],
    steps: int,
    out: Path,
    command: str,
    model: dict[str, int],
    grids: dict[str, tuple[float, ...]],
) -> list[dict[str, Any]]:
    """Tunes each optimizer of ``names`` over its grid on the first of ``seeds``, then runs the
    other seeds at its best rate; skips the runs already in ``out`` and rewrites it after each
    run. Returns all the runs in ``out``."""
    corpus = Corpus(load(), WINDOW)
    refuse_another_model(out, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []

    def run_once(name: str, seed: int, peak: float) -> None:
        nonlocal runs
        runs = _merged(runs, _saved_runs(out, steps))
        if any((r["setting"], r["seed"], _rate(r)) == (name, seed, peak) for r in runs):
            return
        result = train(name, steps, corpus, seed, peak, model)
        runs.append({"setting": name, "seed": seed, "peak_learning_rate": peak, **result})
        print(
            f"{name:14s} peak {peak:<8g} seed {seed} held-out loss "
            f"{result['held_out_losses'][-1]:.4f} ({sum(result['span_seconds']):.0f} s)",
            flush=True,
        )
        runs = _merged(runs, _saved_runs(out, steps))
        record = {
            **(json.loads(out.read_text()) if out.exists() else {}),  # step_times, if any
            "command": command,
            "python": sys.version.split()[0],
            "model": model,
            "corpus_bytes": len(corpus.train) + len(corpus.held_out),
            "steps": steps,
            "eval_every": EVAL_EVERY,
            "runs": runs,
        }
        _write_atomically(out, record)

    for name in names:
        for peak in grids[name]:
            run_once(name, seeds[0], peak)
        best = best_rates(runs, seeds[0])[name]
        for seed in seeds[1:]:
            run_once(name, seed, best)
    return _merged(runs, _saved_runs(out, steps))


def timed(
    out: Path, rates: dict[str, float], model: dict[str, int], rounds: int
) -> dict[str, float]:
    """:func:`step_times` of the optimizers at ``rates``, kept in ``out``: the times saved
    there for the same rates and rounds are reused, others are measured and saved."""
    record = json.loads(out.read_text())
    saved = record.get("step_times", {})
    if (saved.get("rates"), saved.get("rounds"), record.get("model")) == (rates, rounds, model):
        return saved["ms"]
    ms = step_times(rates, Corpus(load(), WINDOW), model, rounds)
    record["step_times"] = {
        "rates": rates,
        "rounds": rounds,
        "steps_per_round": TIMED_STEPS,
        "ms": ms,
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg(),
        "environment": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OPENBLAS_NUM_THREADS")},
    }
    _write_atomically(out, record)
    return ms


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=list(OPTIMIZERS),
        default=list(OPTIMIZERS),
        metavar="NAME",
        help=f"the optimizers to run (default: all of {', '.join(OPTIMIZERS)})",
    )
    parser.add_argument(
        "--model",
        choices=list(MODELS),
        default="small",
        help="the example's model: small (4 blocks, d = 64) or medium (6 blocks, d = 256)",
    )
    parser.add_argument("--out", help="default: benchmarks/results/lm_race_MODEL.json")
    parser.add_argument("--plot", help="default: docs/lm_race_MODEL.png")
    parser.add_argument(
        "--time-rounds",
        type=int,
        default=15,
        help=f"rounds of {TIMED_STEPS} steps per optimizer timed side by side at the end "
        "(0: report the runs' own seconds)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny and short")
    args = parser.parse_args(argv)
    if args.time_rounds < 0:
        parser.error(f"--time-rounds must be >= 0, got {args.time_rounds}")
    if args.steps < EVAL_EVERY or args.steps % EVAL_EVERY:
        parser.error(f"--steps must be a positive multiple of {EVAL_EVERY}, got {args.steps}")
    model, grids = MODELS[args.model], GRIDS
    if args.model == "medium":
        grids = {**GRIDS, **MEDIUM_GRIDS}
    if args.quick:
        model = QUICK_MODEL
        grids = {name: grid[:2] for name, grid in GRIDS.items()}
        args.steps, args.seeds = EVAL_EVERY, args.seeds[:1]
        args.time_rounds = min(args.time_rounds, 2)
    command = "python -m benchmarks.lm_race " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out or f"benchmarks/results/lm_race_{args.model}.json")
    runs = race(args.optimizers, args.seeds, args.steps, out, command, model, grids)
    # The report covers the optimizers asked for; the file keeps every process's runs.
    runs = [r for r in runs if r["setting"] in args.optimizers]
    timed_ms = None
    if args.time_rounds:
        timed_ms = timed(out, best_rates(runs, args.seeds[0]), model, args.time_rounds)
    finals = summary(runs, args.seeds, args.seeds[0], timed_ms)
    print(table(finals))
    plot(finals, args.steps, Path(args.plot or f"docs/lm_race_{args.model}.png"))
    return finals


if __name__ == "__main__":
    main()
