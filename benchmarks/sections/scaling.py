"""``scaling``: ZeRO-1 on 1, 2, 4 and 8 devices: optimizer state bytes per device, step time.

The model: a transformer-shaped tree of about 98M bfloat16 params
(``benchmarks.models.transformer_params`` with 12 blocks, width 768, MLP 3072, vocabulary 8192,
1024 positions; 149 leaves), optimized by ``adam_jax.adamw`` with float32 moments. One
optimizer step (update + ``optax.apply_updates``), jitted with donated params and state and
the params' and state's shardings as ``out_shardings``, on synthetic gradients: replicated
bfloat16 arrays, the all-reduced gradient that every data-parallel step holds. Three
variants on a 1-D ``("data",)`` mesh (``Auto`` axis) of N devices, timed interleaved in one
process and reported by their medians:

* ``replicated state``: the moments replicated like the params (plain data parallelism);
* ``ZeRO-1``: the moments sharded by ``adam_jax.sharding.state_shardings``;
* ``ZeRO-1 + 8-bit``: the same, with 8-bit moments (``adam_jax.eight_bit_moments()``).

The number of host devices is fixed per process (``XLA_FLAGS`` is read before jax starts), so
``run`` starts one subprocess per device count, ``python -m benchmarks.sections.scaling
--devices N --rows-out FILE``. On a GPU the devices are the GPUs, device counts up to their
number. Host devices share the machine's cores and memory bandwidth: there a replicated state
costs N updates of the whole model per step, where on GPUs each device does its own.

``python -m benchmarks.sections.scaling --table RESULTS.json`` prints the section's table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax
from benchmarks.harness import LR, Row, Runner, Settings, Step, adam_step, interleaved
from benchmarks.models import transformer_params

DEVICE_COUNTS = (1, 2, 4, 8)
QUICK_DEVICE_COUNTS = (1, 2)
REPEATS = 7
MODEL = {"layers": 12, "d": 768, "ff": 3072, "vocab": 8192, "seq": 1024}
QUICK_MODEL = {"layers": 2, "d": 64, "ff": 256, "vocab": 256, "seq": 32}
REPLICATED, ZERO1, ZERO1_8BIT = "replicated state", "ZeRO-1", "ZeRO-1 + 8-bit"


def optimizers() -> dict[str, optax.GradientTransformation]:
    float32 = {"mu_dtype": jnp.float32, "nu_dtype": jnp.float32}
    adamw = adam_jax.adamw(LR, weight_decay=1e-2, **float32)
    return {
        REPLICATED: adamw,
        ZERO1: adamw,
        ZERO1_8BIT: adam_jax.adamw(LR, weight_decay=1e-2, **adam_jax.eight_bit_moments()),
    }


class ShardedRunner(Runner):
    """A :class:`Runner` whose step keeps the params and the state in their shardings."""

    def __init__(self, name: str, step: Step, params: Any, grads: Any, state: Any, out: Any):
        super().__init__(name, step, params, grads, state)
        self.fn = jax.jit(step, donate_argnums=(0, 2), out_shardings=out)


def bytes_per_device(tree: Any) -> int:
    """The most bytes of ``tree``'s arrays that one device holds."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


def total_bytes(tree: Any) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def measure(num_devices: int, repeats: int, model: dict[str, int]) -> list[Row]:
    """The three variants on a mesh of the first ``num_devices`` devices."""
    devices = jax.devices()[:num_devices]
    if len(devices) < num_devices:
        raise RuntimeError(f"{num_devices} devices asked for, {jax.device_count()} available")
    mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(AxisType.Auto,), devices=devices)
    replicated = NamedSharding(mesh, P())
    params = jax.tree.map(
        lambda p: p.astype(jnp.bfloat16), transformer_params(jax.random.key(0), **model)
    )
    grads = jax.tree.map(
        lambda g: (1e-3 * g).astype(jnp.bfloat16), transformer_params(jax.random.key(1), **model)
    )
    grads = jax.device_put(grads, replicated)  # shared by the variants (not donated)
    param_shardings = jax.tree.map(lambda _: replicated, params)
    num_params = sum(p.size for p in jax.tree.leaves(params))

    # Fresh buffers for every variant: each donates its own (a device_put may share them).
    copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=param_shardings)
    runners, info = [], {}
    for name, tx in optimizers().items():
        variant_params = copy(params)
        if name == REPLICATED:
            shardings = jax.tree.map(lambda _: replicated, jax.eval_shape(tx.init, params))
        else:
            shardings = adam_jax.sharding.state_shardings(tx, variant_params, mesh)
        state = jax.jit(tx.init, out_shardings=shardings)(variant_params)
        info[name] = {
            "state_bytes_per_device": bytes_per_device(state),
            "state_bytes_total": total_bytes(state),
            "param_bytes_per_device": bytes_per_device(variant_params),
        }
        out_shardings = (param_shardings, shardings)
        runners.append(
            ShardedRunner(name, adam_step(tx), variant_params, grads, state, out_shardings)
        )
    del params
    interleaved(runners, repeats)

    rows = []
    for runner in runners:
        row = {
            "devices": num_devices,
            "platform": devices[0].platform,
            "variant": runner.name,
            "num_params": num_params,
            **info[runner.name],
            "median_ms": 1e3 * runner.median,
            "min_ms": 1e3 * min(runner.times),
            "repeats": len(runner.times),
        }
        rows.append(row)
        print(
            f"  {num_devices} device(s) {runner.name:16s} {row['median_ms']:9.1f} ms   state per "
            f"device {row['state_bytes_per_device'] / 1e6:8.1f} MB",
            flush=True,
        )
        runner.release()
    return rows


def device_counts(quick: bool) -> tuple[int, ...]:
    counts = QUICK_DEVICE_COUNTS if quick else DEVICE_COUNTS
    if jax.default_backend() == "cpu":
        return counts
    return tuple(n for n in counts if n <= jax.device_count())


def child_environment(num_devices: int) -> dict[str, str]:
    """The environment of the subprocess: on CPU, ``num_devices`` host devices."""
    env = dict(os.environ)
    if jax.default_backend() == "cpu":
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    return env


def run(settings: Settings) -> list[Row]:
    repeats = settings.repeats_or(REPEATS, quick=2)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for num_devices in device_counts(settings.quick):
            out = Path(tmp) / f"{num_devices}.json"
            command = [
                sys.executable, "-m", "benchmarks.sections.scaling",
                "--devices", str(num_devices), "--repeats", str(repeats), "--rows-out", str(out),
            ]  # fmt: skip
            if settings.quick:
                command.append("--quick")
            subprocess.run(command, check=True, env=child_environment(num_devices))
            rows += json.loads(out.read_text())
    return rows


def table(rows: list[Row]) -> str:
    """The markdown table of the section's rows: bytes and time against the targets."""
    replicated = {r["devices"]: r for r in rows if r["variant"] == REPLICATED}
    lines = [
        "| devices | variant | state MB / device | x replicated | target | step ms "
        "| x replicated step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = replicated[r["devices"]]
        n = r["devices"]
        target = {REPLICATED: "1", ZERO1: f"1/{n}", ZERO1_8BIT: f"~1/{4 * n}"}[r["variant"]]
        fraction = r["state_bytes_per_device"] / base["state_bytes_per_device"]
        lines.append(
            f"| {n} | {r['variant']} | {r['state_bytes_per_device'] / 1e6:.1f} "
            f"| {fraction:.4f} (1/{1 / fraction:.2f}) | {target} | {r['median_ms']:.1f} "
            f"| {r['median_ms'] / base['median_ms']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, help="measure on this many devices")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--quick", action="store_true", help="a small model, for a smoke test")
    parser.add_argument("--rows-out", help="JSON file the rows are written to")
    parser.add_argument("--table", help="print the table of a results file of benchmarks.run")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())["scaling"]))
        return
    if args.devices is None or args.rows_out is None:
        parser.error("--devices and --rows-out are required (or --table)")
    rows = measure(args.devices, args.repeats, QUICK_MODEL if args.quick else MODEL)
    Path(args.rows_out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
