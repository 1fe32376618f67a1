"""Plots of a results file of ``benchmarks.run``.

python -m benchmarks.plot benchmarks/results/cpu.json --out docs/benchmarks_cpu.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {
    "floor": "#999999",
    "optax.adam": "#d62728",
    "adam_jax.adam": "#1f77b4",
    "adam_jax.adam flat params": "#2ca02c",
    "flat(adam_jax.adam) tree params": "#9467bd",
    "adam_jax.adam bf16 moments": "#ff7f0e",
    "adam_jax.adam 8-bit moments": "#8c564b",
}


def legend(ax: plt.Axes) -> None:
    """A legend where the panel has labelled data: a results file may lack a section."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot(results: dict, out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    machine = results.get("machine", {})

    ax = axes[0]
    steps = results.get("steps", [])
    trees = list(dict.fromkeys(r["tree"] for r in steps))
    variants = [v for v in COLORS if any(r["variant"] == v for r in steps)]
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs, ys = [], []
        for j, t in enumerate(trees):
            for r in steps:
                if r["tree"] == t and r["variant"] == v:
                    xs.append(j + i * width)
                    ys.append(r["gb_per_s"])
        ax.bar(xs, ys, width, label=v, color=COLORS[v])
    for j, t in enumerate(trees):
        stream = [
            r["gb_per_s"] for r in steps if r["tree"] == t and r["variant"].startswith("stream")
        ]
        if stream:
            ax.hlines(
                stream[0],
                j - width / 2,
                j + 0.8 - width / 2,
                colors="k",
                linestyles="--",
                label="bandwidth floor (p + 1 stream)" if j == 0 else None,
            )
    ax.set_xticks(np.arange(len(trees)) + 0.4 - width / 2, trees)
    ax.set_ylabel("achieved GB/s (28 bytes / parameter)")
    ax.set_title("Adam step, 16M float32 parameters")
    legend(ax)

    ax = axes[1]
    comp = results.get("compile", [])
    for v in COLORS:
        rows = sorted((r for r in comp if r["variant"] == v), key=lambda r: r["num_leaves"])
        if rows:
            ax.plot(
                [r["num_leaves"] for r in rows],
                [r["total_s"] for r in rows],
                "o-",
                label=v,
                color=COLORS[v],
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of leaves (16k elements each)")
    ax.set_ylabel("tracing + XLA compilation (s)")
    ax.set_title("Compile time of the jitted step")
    legend(ax)

    ax = axes[2]
    sb = [r for r in results.get("state_bytes", []) if r["tree"] == "1 x 16M"]
    ax.barh([r["storage"] for r in sb], [r["bytes_per_param"] for r in sb], color="#1f77b4")
    for k, r in enumerate(sb):
        ax.text(r["bytes_per_param"] + 0.05, k, f"{r['bytes_per_param']:.2f}", va="center")
    ax.set_xlabel("optimizer state bytes per parameter")
    ax.set_title("Moment storage options")

    fig.suptitle(
        f"adam_jax vs optax.adam on {machine.get('cpu_model', '?')} "
        f"({machine.get('cpu_count', '?')} cores, {machine.get('jax_device', '?')})"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="benchmarks/results/cpu.json")
    parser.add_argument("--out", default="docs/benchmarks_cpu.png")
    args = parser.parse_args()
    plot(json.loads(Path(args.results).read_text()), Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
