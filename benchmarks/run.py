"""All benchmarks of issue 4 in one run, side by side with ``optax.adam``.

    python -m benchmarks.run --out benchmarks/results/cpu.json [--quick]

Sections (each recorded in the JSON file):

* ``steps``: step time and achieved GB/s of one jitted, buffer-donating Adam step
  (update + apply_updates) for float32 trees of 1 x 16M, 16 x 1M, 256 x 62.5k and 1000 x 16k
  elements, for ``optax.adam``, ``adam_jax.adam`` on the tree, ``adam_jax.adam`` on flat params
  (``adam_jax.flat``; the gradient arrives flat, as ``jax.grad`` w.r.t. a ``FlatParams``
  returns it), ``adam_jax.flat.flat(adam)`` on the tree (concatenation inside the update),
  the bfloat16 / 8-bit moment options on the 1-leaf tree, and a "floor" kernel that streams
  the same seven arrays (reads p, g, m, v; writes p, m, v) with no Adam math. GB/s counts the
  nominal 28 bytes per parameter. Variants are timed interleaved (round robin with a rotating
  start) so that machine drift cancels; medians over ``--repeats``.
* ``compile``: tracing + lowering (``jax.jit(f).lower``) and XLA compilation (``.compile()``)
  of the same step for 100, 1000 and 3000 leaves of 16k elements.
* ``train_step``: a full jitted train step (forward, backward, optimizer) of the MNIST CNN
  (batch 128) and of a transformer-like model with about 200 leaves.
* ``state_bytes``: bytes of optimizer state per parameter for each storage option.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax
from adam_jax import flat, quantization

BYTES_PER_PARAM = 28  # read p, g, m, v; write p, m, v (float32)
LR = 1e-3


# ------------------------------------------------------------------------------ helpers


def machine_info() -> dict[str, Any]:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "jax_device": f"{dev.platform}: {dev.device_kind}",
        "jax": jax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg(),
    }


def make_tree(num_leaves: int, leaf_size: int, key: int = 0) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(key), num_leaves)
    return {
        f"p{i:04d}": jax.random.normal(k, (leaf_size,), jnp.float32) for i, k in enumerate(keys)
    }


def abstract_tree(num_leaves: int, leaf_shape: tuple[int, ...]) -> dict[str, Any]:
    return {f"p{i:04d}": jax.ShapeDtypeStruct(leaf_shape, jnp.float32) for i in range(num_leaves)}


def adam_step(tx: optax.GradientTransformation) -> Callable:
    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def floor_step(params, grads, state):
    """Streams the same 7 arrays as Adam (read p, g, m, v; write p, m, v), no Adam math."""
    m, v = state
    return (
        jax.tree.map(lambda p, g: p + g, params, grads),
        (jax.tree.map(lambda a, g: a + g, m, grads), jax.tree.map(lambda a, g: a + g, v, grads)),
    )


def stream_step(params, grads, state):
    """p + 1: one read and one write per element, the machine's streaming bandwidth."""
    del grads
    return jax.tree.map(lambda p: p + 1.0, params), state


class Runner:
    """One benchmark variant: a donating jitted step and its (params, grads, state) buffers."""

    def __init__(self, name: str, step: Callable, params: Any, grads: Any, state: Any):
        self.name = name
        self.fn = jax.jit(step, donate_argnums=(0, 2))
        self.params, self.grads, self.state = params, grads, state
        self.times: list[float] = []

    def __call__(self) -> float:
        start = time.perf_counter()
        self.params, self.state = self.fn(self.params, self.grads, self.state)
        jax.block_until_ready((self.params, self.state))
        return time.perf_counter() - start


def interleaved(runners: list[Runner], repeats: int, warmup: int = 2) -> None:
    for r in runners:
        for _ in range(warmup):
            r()
    for i in range(repeats):
        k = i % len(runners)
        for r in runners[k:] + runners[:k]:
            r.times.append(r())


def copy_tree(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


# ------------------------------------------------------------------------------ sections


TREES = [(1, 16_000_000), (16, 1_000_000), (256, 62_500), (1000, 16_000)]


def bench_steps(repeats: int, trees: list[tuple[int, int]]) -> list[dict[str, Any]]:
    results = []
    for num_leaves, leaf_size in trees:
        n = num_leaves * leaf_size
        params = make_tree(num_leaves, leaf_size)
        grads = make_tree(num_leaves, leaf_size, key=1)
        grads = jax.tree.map(lambda g: 1e-3 * g, grads)
        runners: list[Runner] = []

        def add(name, step, p, g, s, runners=runners):
            runners.append(Runner(name, step, p, g, s))

        zeros = jax.tree.map(jnp.zeros_like, params)
        add("stream (p + 1)", stream_step, flat.flatten(params), None, ())
        add("floor", floor_step, copy_tree(params), grads, (copy_tree(zeros), copy_tree(zeros)))
        ox = optax.adam(LR)
        add("optax.adam", adam_step(ox), copy_tree(params), grads, ox.init(params))
        ours = adam_jax.adam(LR)
        add("adam_jax.adam", adam_step(ours), copy_tree(params), grads, ours.init(params))
        if num_leaves > 1:
            fp = flat.flatten(params)
            add(
                "adam_jax.adam flat params",
                adam_step(ours),
                fp,
                fp.layout.flatten(grads),
                ours.init(fp),
            )
            wrapped = flat.flat(adam_jax.adam(LR))
            add(
                "flat(adam_jax.adam) tree params",
                adam_step(wrapped),
                copy_tree(params),
                grads,
                wrapped.init(params),
            )
        else:
            bf = adam_jax.adam(LR, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
            add(
                "adam_jax.adam bf16 moments",
                adam_step(bf),
                copy_tree(params),
                grads,
                bf.init(params),
            )
            q8 = adam_jax.adam(LR, **quantization.eight_bit_moments())
            add(
                "adam_jax.adam 8-bit moments",
                adam_step(q8),
                copy_tree(params),
                grads,
                q8.init(params),
            )
        del params, zeros
        interleaved(runners, repeats)
        # Streaming bandwidth of one fused loop over one buffer (8 bytes per element), and the
        # time 28 bytes per parameter would take at that bandwidth: the bandwidth floor.
        stream_bw = 8 * n / statistics.median(runners[0].times)
        bw_floor = BYTES_PER_PARAM * n / stream_bw
        floor = statistics.median(runners[1].times)
        for r in runners:
            med = statistics.median(r.times)
            bytes_moved = 8 * n if r.name.startswith("stream") else BYTES_PER_PARAM * n
            results.append(
                {
                    "tree": f"{num_leaves} x {leaf_size}",
                    "num_leaves": num_leaves,
                    "leaf_size": leaf_size,
                    "variant": r.name,
                    "median_ms": 1e3 * med,
                    "min_ms": 1e3 * min(r.times),
                    "gb_per_s": bytes_moved / med / 1e9,
                    "vs_floor": med / floor,
                    "vs_bandwidth_floor": med / bw_floor,
                    "bandwidth_floor_ms": 1e3 * bw_floor,
                    "repeats": len(r.times),
                }
            )
            print(
                f"  {num_leaves:5d} x {leaf_size:9d} {r.name:34s} {1e3 * med:9.2f} ms "
                f"{bytes_moved / med / 1e9:6.2f} GB/s  x{med / floor:.2f} floor  "
                f"x{med / bw_floor:.2f} bandwidth floor",
                flush=True,
            )
        for r in runners:
            del r.params, r.grads, r.state
    return results


def _time_compile(step: Callable, args: tuple) -> tuple[float, float]:
    fn = jax.jit(step, donate_argnums=(0, 2))
    start = time.perf_counter()
    lowered = fn.lower(*args)
    traced = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    return traced, time.perf_counter() - start


def bench_compile(leaf_counts: list[int], leaf_shape=(125, 128)) -> list[dict[str, Any]]:
    results = []
    for num_leaves in leaf_counts:
        params = abstract_tree(num_leaves, leaf_shape)
        variants = {
            "optax.adam": (optax.adam(LR), params),
            "adam_jax.adam": (adam_jax.adam(LR), params),
            "adam_jax.adam flat params": (adam_jax.adam(LR), "flat"),
            "flat(adam_jax.adam) tree params": (flat.flat(adam_jax.adam(LR)), params),
        }
        for name, (tx, p) in variants.items():
            if p == "flat":
                layout = flat.layout_of(params)
                p = flat.FlatParams(
                    tuple(jax.ShapeDtypeStruct((g.size,), g.dtype) for g in layout.groups),
                    layout,
                )
            state = jax.eval_shape(tx.init, p)
            # Fresh closures every time: nothing is reused from jax's tracing caches.
            step = adam_step(tx)
            fresh = lambda a, b, c, step=step: step(a, b, c)  # noqa: E731
            traced, compiled = _time_compile(fresh, (p, p, state))
            results.append(
                {
                    "num_leaves": num_leaves,
                    "variant": name,
                    "trace_s": traced,
                    "compile_s": compiled,
                    "total_s": traced + compiled,
                }
            )
            print(
                f"  {num_leaves:5d} leaves {name:34s} trace {traced:7.2f} s  XLA {compiled:7.2f} s",
                flush=True,
            )
    return results


# ------------------------------------------------------------------------------ models


def transformer_params(key, layers=16, d=64, ff=256, vocab=256, seq=32):
    """A transformer-like parameter tree: 12 leaves per block, 16 blocks, ~200 leaves."""
    ks = iter(jax.random.split(key, 8 * layers + 8))

    def dense(i, o):
        return jax.random.normal(next(ks), (i, o)) * (i**-0.5)

    blocks = []
    for _ in range(layers):
        blocks.append(
            {
                "ln1": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
                "attn": {
                    "wq": dense(d, d),
                    "wk": dense(d, d),
                    "wv": dense(d, d),
                    "wo": dense(d, d),
                },
                "ln2": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
                "mlp": {
                    "w1": dense(d, ff),
                    "b1": jnp.zeros(ff),
                    "w2": dense(ff, d),
                    "b2": jnp.zeros(d),
                },
            }
        )
    return {
        "embed": dense(vocab, d),
        "pos": dense(seq, d) * 0.1,
        "blocks": blocks,
        "ln_f": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
        "head": dense(d, vocab),
    }


def transformer_loss(params, tokens, heads=4):
    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]

    x = params["embed"][tokens[:, :-1]] + params["pos"][: tokens.shape[1] - 1]
    b, t, d = x.shape
    mask = jnp.tril(jnp.ones((t, t), bool))
    for blk in params["blocks"]:
        h = ln(x, blk["ln1"])
        q, k, v = (
            (h @ blk["attn"][w]).reshape(b, t, heads, d // heads) for w in ("wq", "wk", "wv")
        )
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
        x = x + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d) @ blk["attn"]["wo"]
        h = ln(x, blk["ln2"])
        x = (
            x
            + jax.nn.gelu(h @ blk["mlp"]["w1"] + blk["mlp"]["b1"]) @ blk["mlp"]["w2"]
            + blk["mlp"]["b2"]
        )
    logits = ln(x, params["ln_f"]) @ params["head"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def cnn_model():
    """The MNIST CNN of examples/mnist (if importable), else the same architecture here."""
    from flax import nnx

    try:
        from examples.mnist.models import CNN
    except ImportError:  # pragma: no cover

        class CNN(nnx.Module):
            def __init__(self, *, rngs):
                self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
                self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
                self.dense1 = nnx.Linear(7 * 7 * 64, 256, rngs=rngs)
                self.dense2 = nnx.Linear(256, 10, rngs=rngs)

            def __call__(self, x):
                pool = lambda y: nnx.avg_pool(y, window_shape=(2, 2), strides=(2, 2))  # noqa
                x = pool(nnx.relu(self.conv1(x)))
                x = pool(nnx.relu(self.conv2(x)))
                return self.dense2(nnx.relu(self.dense1(x.reshape(x.shape[0], -1))))

    model = CNN(rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, batch):
        x, y = batch
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, loss


def tree_train_step(tx: optax.GradientTransformation, loss: Callable) -> Callable:
    def train_step(params, batch, state):
        g = jax.grad(loss)(params, batch)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    return train_step


def flat_train_step(tx: optax.GradientTransformation, loss: Callable) -> Callable:
    """The model reads views of the flat buffer; the gradient comes back flat."""

    def train_step(fp, batch, state):
        g = jax.grad(lambda f, b: loss(f.to_tree(), b))(fp, batch)
        u, state = tx.update(g, state, fp)
        return optax.apply_updates(fp, u), state

    return train_step


def bench_train_steps(repeats: int) -> list[dict[str, Any]]:
    results = []
    key = jax.random.key(0)
    models = {}
    tparams = transformer_params(key)
    tokens = jax.random.randint(key, (8, 33), 0, 256)
    models["transformer-like"] = (tparams, transformer_loss, tokens)
    cparams, closs = cnn_model()
    batch = (jax.random.normal(key, (128, 28, 28, 1)), jax.random.randint(key, (128,), 0, 10))
    models["mnist_cnn"] = (cparams, closs, batch)

    for model_name, (params, loss, batch) in models.items():
        num_leaves = len(jax.tree.leaves(params))
        n = sum(x.size for x in jax.tree.leaves(params))

        runners, compile_times = [], {}
        variants = [
            ("optax.adam", optax.adam(LR), tree_train_step, params),
            ("adam_jax.adam", adam_jax.adam(LR), tree_train_step, params),
            ("adam_jax.adam flat params", adam_jax.adam(LR), flat_train_step, flat.flatten(params)),
            (
                "adam_jax.adam 8-bit moments",
                adam_jax.adam(LR, **quantization.eight_bit_moments()),
                tree_train_step,
                params,
            ),
        ]
        for name, tx, make, p in variants:
            p = copy_tree(p)
            state = tx.init(p)
            step = make(tx, loss)
            traced, compiled = _time_compile(step, (p, batch, state))
            compile_times[name] = (traced, compiled)
            runners.append(Runner(name, step, p, batch, state))
        interleaved(runners, repeats)
        for r in runners:
            med = statistics.median(r.times)
            results.append(
                {
                    "model": model_name,
                    "num_leaves": num_leaves,
                    "num_params": n,
                    "variant": r.name,
                    "median_ms": 1e3 * med,
                    "min_ms": 1e3 * min(r.times),
                    "trace_s": compile_times[r.name][0],
                    "compile_s": compile_times[r.name][1],
                    "repeats": len(r.times),
                }
            )
            print(
                f"  {model_name:16s} ({num_leaves} leaves, {n} params) {r.name:30s} "
                f"{1e3 * med:8.2f} ms  compile {sum(compile_times[r.name]):6.2f} s",
                flush=True,
            )
    return results


def bench_billion(repeats: int, size: int = 1_000_000_000) -> list[dict[str, Any]]:
    """One Adam step on a single float32 leaf of ``size`` elements (GPU: 28 GB of traffic)."""
    results = []
    params = {"w": jnp.zeros((size,), jnp.float32)}
    grads = {"w": jnp.full((size,), 1e-3, jnp.float32)}
    tx = adam_jax.adam(LR)
    ox = optax.adam(LR)
    runners = [Runner("adam_jax.adam", adam_step(tx), params, grads, tx.init(params))]
    # optax.adam needs its own copy of params and state: only when memory allows (H200).
    free = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
    limit = free.get("bytes_limit", 0) - free.get("bytes_in_use", 0)
    if limit > 4 * 4 * size * 1.1:  # p, g, m, v of a second optimizer
        runners.append(
            Runner(
                "optax.adam", adam_step(ox), {"w": jnp.copy(params["w"])}, grads, ox.init(params)
            )
        )
    interleaved(runners, repeats)
    for r in runners:
        med = statistics.median(r.times)
        results.append(
            {
                "num_params": size,
                "variant": r.name,
                "median_ms": 1e3 * med,
                "gb_per_s": BYTES_PER_PARAM * size / med / 1e9,
                "repeats": len(r.times),
            }
        )
        print(
            f"  1B params {r.name:20s} {1e3 * med:8.2f} ms "
            f"{BYTES_PER_PARAM * size / med / 1e9:7.1f} GB/s",
            flush=True,
        )
    return results


def bench_state_bytes() -> list[dict[str, Any]]:
    key = jax.random.key(0)
    trees = {
        "1 x 16M": {"w": jax.ShapeDtypeStruct((16_000_000,), jnp.float32)},
        "transformer-like": jax.eval_shape(lambda: transformer_params(key)),
        "mnist_cnn": jax.eval_shape(lambda: cnn_model()[0]),
    }
    options = {
        "optax.adam (float32)": optax.adam(LR),
        "float32": adam_jax.adam(LR),
        "bfloat16 mu": adam_jax.adam(LR, mu_dtype=jnp.bfloat16),
        "bfloat16 mu + nu": adam_jax.adam(LR, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
        "8-bit mu + nu": adam_jax.adam(LR, **quantization.eight_bit_moments()),
        "8-bit mu + bfloat16 nu": adam_jax.adam(
            LR, mu_dtype=quantization.BlockwiseQuantized(signed=True), nu_dtype=jnp.bfloat16
        ),
    }
    results = []
    for tree_name, tree in trees.items():
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
        for name, tx in options.items():
            state = jax.eval_shape(tx.init, tree)
            b = quantization.state_bytes(state)
            results.append(
                {
                    "tree": tree_name,
                    "num_params": n,
                    "storage": name,
                    "state_bytes": b,
                    "bytes_per_param": b / n,
                }
            )
        # On flat params the small leaves share the big buffer, so they get quantized too.
        layout = flat.layout_of(tree)
        fp = flat.FlatParams(
            tuple(jax.ShapeDtypeStruct((g.size,), g.dtype) for g in layout.groups), layout
        )
        state = jax.eval_shape(options["8-bit mu + nu"].init, fp)
        b = quantization.state_bytes(state)
        results.append(
            {
                "tree": tree_name,
                "num_params": n,
                "storage": "8-bit mu + nu, flat params",
                "state_bytes": b,
                "bytes_per_param": b / n,
            }
        )
    return results


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/cpu.json")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    on_gpu = jax.default_backend() == "gpu"
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["state_bytes", "steps", "compile", "train_step"] + (["billion"] if on_gpu else []),
    )
    parser.add_argument(
        "--plot",
        default=None,
        help="PNG to write at the end (default docs/benchmarks_<backend>.png)",
    )
    parser.add_argument("--compile-leaves", type=int, nargs="+", default=[100, 1000, 3000])
    args = parser.parse_args()

    trees = TREES
    compile_leaves = args.compile_leaves
    repeats = args.repeats
    if args.quick:
        trees = [(1, 160_000), (100, 1_600)]
        compile_leaves = [10, 100]
        repeats = 3
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    machine = machine_info()
    command = "python -m benchmarks.run " + " ".join(os.sys.argv[1:])
    results["machine"] = machine
    print(json.dumps(machine), flush=True)

    def save():
        out.write_text(json.dumps(results, indent=2) + "\n")

    for section in args.sections:
        start = time.perf_counter()
        print(f"== {section}", flush=True)
        if section == "state_bytes":
            results[section] = bench_state_bytes()
        elif section == "steps":
            results[section] = bench_steps(repeats, trees)
        elif section == "compile":
            results[section] = bench_compile(compile_leaves)
        elif section == "billion":
            results[section] = bench_billion(max(3, repeats // 3))
        elif section == "train_step":
            results[section] = bench_train_steps(max(3, repeats // 2) if not args.quick else 2)
        else:
            raise ValueError(f"unknown section {section}")
        results.setdefault("section_seconds", {})[section] = time.perf_counter() - start
        results.setdefault("section_runs", {})[section] = {
            "command": command,
            "date_utc": machine["date_utc"],
            "load_average_at_start": machine["load_average_at_start"],
        }
        save()
    print(f"results written to {out}")
    from benchmarks import plot as plot_lib

    png = Path(args.plot or f"docs/benchmarks_{jax.default_backend()}.png")
    plot_lib.plot(results, png)
    print(f"plot written to {png}")


if __name__ == "__main__":
    main()
