"""Markdown tables of a results file of ``benchmarks.run`` (as in docs/speed.md, docs/memory.md).

python -m benchmarks.summarize benchmarks/results/cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.sections import scaling


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summarize(results: dict, mnist: dict | None = None) -> str:
    out = []
    m = results.get("machine", {})
    out.append(
        f"Machine: {m.get('cpu_model')} ({m.get('cpu_count')} cores), "
        f"jax {m.get('jax')} ({m.get('jax_device')}), optax {m.get('optax')}."
    )
    for section, run in results.get("section_runs", {}).items():
        out.append(
            f"- `{section}`: `{run['command']}` at {run['date_utc']}, load average "
            f"{', '.join(f'{x:.1f}' for x in run['load_average_at_start'])}"
        )
    steps = results.get("steps", [])
    if steps:
        trees = list(dict.fromkeys(r["tree"] for r in steps))
        optax_ms = {r["tree"]: r["median_ms"] for r in steps if r["variant"] == "optax.adam"}
        rows = []
        for t in trees:
            for r in steps:
                if r["tree"] != t:
                    continue
                stream = r["variant"].startswith("stream")
                rows.append(
                    [
                        t,
                        r["variant"],
                        f"{r['median_ms']:.2f}",
                        f"{r['gb_per_s']:.2f}" + (" (8 B/elem)" if stream else ""),
                        "" if stream else f"{r['vs_floor']:.2f}",
                        "" if stream else f"{r.get('vs_bandwidth_floor', float('nan')):.2f}",
                        "" if stream else f"{optax_ms[t] / r['median_ms']:.2f}",
                    ]
                )
        out.append("\n### Step time (16M float32 parameters, median)\n")
        out.append(
            _table(
                [
                    "tree",
                    "variant",
                    "ms",
                    "GB/s",
                    "x floor kernel",
                    "x bandwidth floor",
                    "speed-up vs optax",
                ],
                rows,
            )
        )
    leaves = results.get("leaves", [])
    if leaves:
        rows = [
            [r["tree"], r["variant"], f"{r['median_ms']:.3f}", f"{r['ratio_vs_optax']:.3f}"]
            for r in leaves
        ]
        out.append("\n### Step time on 1 and 64 leaves, relative to optax.adam (median)\n")
        out.append(_table(["tree", "variant", "ms", "time / optax.adam"], rows))
    leaf_cost = results.get("leaf_cost", [])
    if leaf_cost:
        rows = [
            [
                r["tree"],
                r["variant"],
                f"{r['kernels']} ({r['fusions']}, {r['custom_calls']})",
                str(r["num_args"]),
                f"{r['median_ms']:.3f}",
                f"{r['dispatch_ms']:.3f}",
                f"{r['us_per_leaf']:.1f}",
                f"{r['noop_share']:.2f}" if "noop_share" in r else "",
                f"{r['us_per_kernel']:.1f}" if "us_per_kernel" in r else "",
            ]
            for r in leaf_cost
        ]
        out.append("\n### Where a tree's per-leaf cost goes (median)\n")
        header = [
            "tree",
            "variant",
            "kernels (fusions, custom calls)",
            "arguments",
            "ms",
            "dispatch ms",
            "us / leaf",
            "no-op / step",
            "us / kernel beyond the no-op",
        ]
        out.append(_table(header, rows))
    comp = results.get("compile", [])
    if comp:
        ref = {r["num_leaves"]: r["total_s"] for r in comp if r["variant"] == "optax.adam"}
        rows = [
            [
                str(r["num_leaves"]),
                r["variant"],
                f"{r['trace_s']:.2f}",
                f"{r['compile_s']:.2f}",
                f"{r['total_s']:.2f}",
                f"{ref[r['num_leaves']] / r['total_s']:.1f}",
            ]
            for r in comp
        ]
        out.append("\n### Compile time of the jitted step (leaves of 125 x 128 float32)\n")
        out.append(
            _table(
                ["leaves", "variant", "tracing s", "XLA s", "total s", "speed-up vs optax"], rows
            )
        )
    ts = results.get("train_step", [])
    if ts:
        ref = {r["model"]: r["median_ms"] for r in ts if r["variant"] == "optax.adam"}
        rows = [
            [
                f"{r['model']} ({r['num_leaves']} leaves, {r['num_params'] / 1e6:.2f}M)",
                r["variant"],
                f"{r['median_ms']:.1f}",
                f"{ref[r['model']] / r['median_ms']:.2f}",
                f"{r['trace_s'] + r['compile_s']:.1f}",
            ]
            for r in ts
        ]
        out.append("\n### Full train step (forward + backward + optimizer)\n")
        out.append(_table(["model", "variant", "ms", "speed-up vs optax", "compile s"], rows))
    sb = results.get("state_bytes", [])
    if sb:
        trees = list(dict.fromkeys(r["tree"] for r in sb))
        storages = list(dict.fromkeys(r["storage"] for r in sb))
        rows = []
        for s in storages:
            row = [s]
            for t in trees:
                v = [r["bytes_per_param"] for r in sb if r["tree"] == t and r["storage"] == s]
                row.append(f"{v[0]:.3f}" if v else "")
            rows.append(row)
        out.append("\n### Optimizer state, bytes per parameter\n")
        out.append(_table(["storage"] + trees, rows))
    bl = results.get("billion", [])
    if bl:
        out.append("\n### 1B float32 parameters, one step\n")
        out.append(
            _table(
                ["variant", "ms", "GB/s"],
                [[r["variant"], f"{r['median_ms']:.2f}", f"{r['gb_per_s']:.0f}"] for r in bl],
            )
        )
    eight_bit = results.get("eight_bit", [])
    if eight_bit:
        out.append("\n### 8-bit moments against float32 moments (median)\n")
        rows = [
            [
                r["tree"],
                r["variant"],
                f"{r['median_ms']:.2f}",
                f"{r['ratio_vs_float32']:.2f}",
                f"{r.get('page_faults_per_step', float('nan')):.0f}",
            ]
            for r in eight_bit
        ]
        out.append(_table(["tree", "variant", "ms", "time / float32", "page faults"], rows))
    family = results.get("variants", [])
    if family:
        out.append("\n### The modern Adam family against optax's namesakes and adamw (median)\n")
        rows = [
            [
                r["tree"],
                r["variant"],
                f"{r['median_ms']:.2f}",
                "-" if r["optax_median_ms"] is None else f"{r['optax_median_ms']:.2f}",
                "-" if r["ratio_vs_optax"] is None else f"{r['ratio_vs_optax']:.3f}",
                f"{r['ratio_vs_adamw']:.3f}",
            ]
            for r in family
        ]
        header = ["tree", "variant", "ms", "optax ms", "time / optax", "time / adamw"]
        out.append(_table(header, rows))
    wrapped = results.get("low_precision", [])
    if wrapped:
        out.append("\n### Low-precision wrappers against the plain bfloat16 step (median)\n")
        rows = [
            [r["tree"], r["variant"], f"{r['median_ms']:.2f}", f"{r['ratio_vs_plain']:.3f}"]
            for r in wrapped
        ]
        out.append(_table(["tree", "params / updates", "ms", "time / plain bfloat16"], rows))
    if results.get("scaling"):
        out.append("\n### ZeRO-1 on 1 to 8 devices\n")
        out.append(scaling.table(results["scaling"]))
    if mnist:
        out.append("\n### MNIST CNN test accuracy, float32 vs 8-bit moments\n")
        rows = [
            [
                r["moments"],
                str(r["seed"]),
                str(r["epochs"]),
                f"{100 * r['test_accuracy']:.2f}",
                f"{r['optimizer_state_bytes']}",
            ]
            for r in mnist["runs"]
        ]
        out.append(_table(["moments", "seed", "epochs", "test accuracy %", "state bytes"], rows))
        for k, v in mnist.get("summary", {}).items():
            if v["mean_test_accuracy"] is not None:
                out.append(
                    f"\n- {k}: mean {100 * v['mean_test_accuracy']:.3f} % over {v['seeds']} seed(s)"
                )
        by: dict[int, dict[str, float]] = {}
        for r in mnist["runs"]:
            by.setdefault(r["seed"], {})[r["moments"]] = r["test_accuracy"]
        pairs = [v for v in by.values() if len(v) == 2]
        if pairs:
            diff = [100 * (v["8bit_moments"] - v["float32_moments"]) for v in pairs]
            out.append(
                f"- 8-bit minus float32 over the {len(pairs)} complete seed pair(s): "
                f"{sum(diff) / len(diff):+.3f} percentage points "
                f"(per seed: {', '.join(f'{d:+.2f}' for d in diff)})"
            )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="benchmarks/results/cpu.json")
    parser.add_argument("--mnist", default="benchmarks/results/mnist_8bit.json")
    args = parser.parse_args()
    mnist_path = Path(args.mnist)
    mnist = json.loads(mnist_path.read_text()) if mnist_path.exists() else None
    print(summarize(json.loads(Path(args.results).read_text()), mnist))


if __name__ == "__main__":
    main()
