"""The ``leaves`` ratio (adam_jax.adam / optax.adam step time) of two checkouts of adam_jax.

    git worktree add /tmp/adam_base 8556ab0
    python -m benchmarks.compare_revisions --baseline /tmp/adam_base --rounds 7 \\
        --out /tmp/leaves_before_after.json

Runs ``python -m benchmarks.run --sections leaves`` (this checkout's benchmark code) in a fresh
process per measurement, alternating between the baseline's ``adam_jax`` package and the
candidate's (``--candidate``, by default this checkout's), rotating which goes first,
``--rounds`` times each. Each process times its adam_jax against optax.adam interleaved, so its
ratio is immune to drift between processes; the table gives, per checkout, the median of the
per-process ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASELINE = "baseline"
CANDIDATE = "candidate"
OURS = "adam_jax.adam"


def measure_once(python_path: str, package: Path, repeats: int | None) -> dict[str, Any]:
    """Machine and ``leaves`` rows of one fresh process importing adam_jax from ``python_path``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "leaves.json"
        # -P: the working directory (this checkout) must not shadow python_path's adam_jax.
        command = [sys.executable, "-P", "-m", "benchmarks.run", "--sections", "leaves"]
        command += ["--out", str(out)] + ([] if repeats is None else ["--repeats", str(repeats)])
        env = {**os.environ, "PYTHONPATH": python_path}
        subprocess.run(command, cwd=REPO, env=env, check=True)
        results = json.loads(out.read_text())
    measured = Path(results["machine"]["adam_jax_path"])
    if measured != package.resolve():
        raise RuntimeError(f"measured adam_jax at {measured}, expected {package}")
    return {"machine": results["machine"], "leaves": results["leaves"]}


def summarize_runs(label: str, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per tree: the median over processes of adam_jax.adam's ratio to optax.adam."""
    by_tree: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        for row in run["leaves"]:
            if row["variant"] == OURS:
                by_tree.setdefault(row["tree"], []).append(row)
    return [
        {
            "checkout": label,
            "tree": tree,
            "ratio_vs_optax_median": statistics.median(r["ratio_vs_optax"] for r in rows),
            "ratio_vs_optax_per_run": [r["ratio_vs_optax"] for r in rows],
            "adam_jax_median_ms": statistics.median(r["median_ms"] for r in rows),
        }
        for tree, rows in by_tree.items()
    ]


def compare(checkouts: dict[str, Path], rounds: int, repeats: int | None) -> dict[str, Any]:
    """The per-process runs of each checkout and, per tree and checkout, their median ratio."""
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        python_paths = {}
        for label, checkout in checkouts.items():
            # A directory holding only this checkout's package, ahead of the benchmark code.
            shim = Path(tmp) / label
            shim.mkdir()
            (shim / "adam_jax").symlink_to(checkout.resolve() / "adam_jax")
            python_paths[label] = f"{shim}{os.pathsep}{REPO}"
        labels = list(checkouts)
        for i in range(rounds):
            for label in labels[i % 2 :] + labels[: i % 2]:
                print(f"== round {i + 1}/{rounds}: {label} {checkouts[label]}", flush=True)
                package = checkouts[label] / "adam_jax"
                runs[label].append(measure_once(python_paths[label], package, repeats))
    summary = [row for label in labels for row in summarize_runs(label, runs[label])]
    return {"summary": summary, "runs": runs}


def table(summary: list[dict[str, Any]]) -> str:
    by_tree: dict[str, dict[str, dict[str, Any]]] = {}
    for row in summary:
        by_tree.setdefault(row["tree"], {})[row["checkout"]] = row
    lines = [
        "| tree | baseline: ours / optax (median; range) | candidate: ours / optax "
        "(median; range) | candidate / baseline |",
        "|---|---|---|---|",
    ]
    for tree, rows in by_tree.items():
        cells = []
        for label in (BASELINE, CANDIDATE):
            ratios = rows[label]["ratio_vs_optax_per_run"]
            cells.append(
                f"{rows[label]['ratio_vs_optax_median']:.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
            )
        change = rows[CANDIDATE]["ratio_vs_optax_median"] / rows[BASELINE]["ratio_vs_optax_median"]
        lines.append(f"| {tree} | {cells[0]} | {cells[1]} | {change:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="checkout with adam_jax/")
    parser.add_argument(
        "--candidate", type=Path, default=REPO, help="checkout with adam_jax/ (default: this one)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="processes per checkout")
    parser.add_argument("--repeats", type=int, help="timed calls per variant and process")
    parser.add_argument("--out", type=Path, help="JSON file for the per-run rows and the summary")
    args = parser.parse_args()
    checkouts = {BASELINE: args.baseline, CANDIDATE: args.candidate}
    result = compare(checkouts, args.rounds, args.repeats)
    if args.out:
        header = {
            "command": "python -m benchmarks.compare_revisions " + " ".join(sys.argv[1:]),
            "checkouts": {label: str(path) for label, path in checkouts.items()},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**header, **result}, indent=2) + "\n")
    print(table(result["summary"]))


if __name__ == "__main__":
    main()
