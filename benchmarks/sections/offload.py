"""``offload``: the device bytes and the time of a step whose state is in host memory.

For each setting, the jitted, donating step (update + apply) with the state on the device
and wrapped in :func:`adam_jax.offload_state`, on two trees: the transformer-like tree of
:mod:`benchmarks.models` (16 blocks, d = 64) and GPT-2 small's shapes (12 blocks, d = 768,
vocabulary 50257, an untied head: 163M params), both from abstract shapes (nothing is
allocated). :func:`device_bytes` reads from the compiled program what it keeps in device
memory: its arguments and outputs by memory kind, the outputs that reuse a donated argument's
buffer (the module's ``input_output_alias``) counted once, and every temporary. XLA:CPU does
not split temporaries by memory space (``memory_analysis()``'s ``host_*`` fields are 0 on
jax 0.10), so all of them are counted as device bytes: an upper bound.

Each memory row also keeps ``memory_analysis()`` of both programs as XLA reports it: on a GPU
its ``host_*`` fields split host from device buffers, and ``temp_size_in_bytes`` counts the
device's temporaries alone.

The time rows run both steps of each setting on real arrays in the same rounds (interleaved);
``ratio_vs_device`` is the median over rounds of the offloaded step's time over the on-device
step's. The optimizer step runs on the transformer-like tree; on a GPU, on a 98M-param tree of
the same layout (12 blocks, d = 768, vocabulary 8192, 1024 positions), and so does a whole
train step (forward, backward and float32 AdamW on 8 x 1024 tokens), the step that torchao's
``CPUOffloadOptimizer`` reports (1.2x on a 1.1B model). On CPU both memory kinds are the same
RAM, so the ratio says only what the extra copies in the program cost, not what a PCIe
transfer costs.

"8-bit, in slices" is the 8-bit step in :func:`adam_jax.step_in_slices`
(:data:`SLICE_ELEMENTS`): a large leaf stepped a slice of rows at a time, on the device and
offloaded. :func:`slice_time_rows` times it offloaded against the
same step whole on one leaf of GPT-2's embedding shape, in the same rounds.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adam_jax
from benchmarks.harness import LR, Row, Runner, Settings, adam_step, copy_tree, interleaved
from benchmarks.hlo_program import aliased_buffers
from benchmarks.models import transformer_loss, transformer_params
from benchmarks.sections.train_step import tree_train_step

REPEATS = 20
#: The most elements of a leaf stepped at once (``step_in_slices``'s ``max_elements``).
SLICE_ELEMENTS = 1 << 20
HEADS = 4
HOST = "pinned_host"

#: name -> optimizer, each run on the device and offloaded.
SETTINGS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "float32 AdamW": lambda: adam_jax.adamw(LR),
    "Adam-mini": lambda: adam_jax.adam_mini(LR, num_heads=HEADS),
    "8-bit moments": lambda: adam_jax.adamw_8bit(LR),
    "4-bit moments": lambda: adam_jax.adamw(LR, **adam_jax.four_bit_moments()),
    "8-bit, in slices": lambda: adam_jax.step_in_slices(adam_jax.adamw_8bit(LR), SLICE_ELEMENTS),
}
#: The leaf whose offloaded 8-bit step is timed whole and in slices: GPT-2's embedding.
SLICED_LEAF = (50257, 768)
#: The settings timed on real arrays (the others' copies are the same kind of program).
TIMED = ("float32 AdamW", "8-bit moments")
#: The timed tree's size on a GPU: the scaling section's 98M-param transformer.
GPU_TREE = {"layers": 12, "d": 768, "ff": 3072, "vocab": 8192, "seq": 1024}
GPU_BATCH = (8, 1025)


def gpt2_small() -> Any:
    """GPT-2 small's parameter shapes (the transformer-like tree's layout at d = 768): 163M."""
    return jax.eval_shape(
        lambda: transformer_params(
            jax.random.key(0), layers=12, d=768, ff=3072, vocab=50257, seq=1024
        )
    )


def transformer_like() -> Any:
    """The transformer-like tree of the memory section (16 blocks, d = 64)."""
    return jax.eval_shape(lambda: transformer_params(jax.random.key(0), layers=16))


TREES: dict[str, Callable[[], Any]] = {
    "transformer-like": transformer_like,
    "GPT-2 small": gpt2_small,
}


def _nbytes(shape: tuple[int, ...], dtype: Any, sharding: Any) -> int:
    """Bytes of one device's shard of an array."""
    local = sharding.shard_shape(shape) if sharding is not None else shape
    return int(np.prod(local, dtype=np.int64)) * np.dtype(dtype).itemsize


def device_bytes(compiled: jax.stages.Compiled) -> dict[str, int]:
    """What one device of ``compiled`` keeps in device memory, by what the program says.

    Returns ``arguments`` (the bytes of the arguments in device memory), ``outputs`` (those of
    the outputs in device memory that do not reuse a donated argument's buffer), ``temporaries``
    (XLA's temporaries, of any memory space: XLA:CPU does not tell them apart) and ``total``.
    """
    args = [info for info in jax.tree.leaves(compiled.args_info) if info is not None]
    in_shardings = jax.tree.leaves(compiled.input_shardings[0])
    outs = jax.tree.leaves(compiled.out_info)
    in_device = [s.memory_kind != HOST for s in in_shardings]
    arguments = sum(
        _nbytes(info.shape, info.dtype, sharding)
        for info, sharding, device in zip(args, in_shardings, in_device, strict=True)
        if device
    )
    aliased = {output for output, _ in aliased_buffers(compiled.as_text())}
    outputs = sum(
        _nbytes(out.shape, out.dtype, out.sharding)
        for i, out in enumerate(outs)
        if out.sharding.memory_kind != HOST and i not in aliased
    )
    analysis = compiled.memory_analysis()
    temporaries = int(analysis.temp_size_in_bytes)
    return {
        "arguments": arguments,
        "outputs": outputs,
        "temporaries": temporaries,
        "total": arguments + outputs + temporaries,
    }


def host_leaves(tx: optax.GradientTransformation, params: Any) -> list[bool]:
    """Which arrays of ``tx``'s state (an ``offload_state``) its ``init`` puts in host memory,
    in the state's flattening order: read from the memory space of the traced ``init``'s
    outputs, so that an abstract step is placed as the real one."""
    state = jax.jit(tx.init).trace(params).out_avals
    return [leaf.memory_space == jax.memory.Space.Host for leaf in jax.tree.leaves(state)]


def in_host_memory(tx: optax.GradientTransformation, params: Any) -> Any:
    """The abstract state of ``tx`` (an ``offload_state``) on the default device, each array
    in the memory its ``init`` puts it in (:func:`host_leaves`)."""
    device = jax.devices()[0]
    state = jax.eval_shape(tx.init, params)
    leaves, treedef = jax.tree.flatten(state)
    placed = [
        jax.ShapeDtypeStruct(
            x.shape,
            x.dtype,
            sharding=jax.sharding.SingleDeviceSharding(
                device, memory_kind=HOST if host else "device"
            ),
        )
        for x, host in zip(leaves, host_leaves(tx, params), strict=True)
    ]
    return jax.tree.unflatten(treedef, placed)


def compiled_steps(
    make: Callable[[], optax.GradientTransformation], params: Any
) -> tuple[jax.stages.Compiled, jax.stages.Compiled, Any]:
    """The donating step of ``make()`` compiled on the device and offloaded, and its state's
    abstract arrays."""
    tx = make()
    state = jax.eval_shape(tx.init, params)
    offloaded = adam_jax.offload_state(tx)
    on_device_step = jax.jit(adam_step(tx), donate_argnums=(0, 2))
    offloaded_step = jax.jit(adam_step(offloaded), donate_argnums=(0, 2))
    return (
        on_device_step.lower(params, params, state).compile(),
        offloaded_step.lower(params, params, in_host_memory(offloaded, params)).compile(),
        state,
    )


def memory_rows(trees: tuple[str, ...] = tuple(TREES), rows: list[Row] | None = None) -> list[Row]:
    """The device bytes of each setting on each tree, appended to ``rows`` as each is made."""
    rows = [] if rows is None else rows
    for tree_name in trees:
        params = TREES[tree_name]()
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        params_bytes = adam_jax.state_bytes(params)
        for name, make in SETTINGS.items():
            on_device, offloaded, state = compiled_steps(make, params)
            largest = largest_leaf_state(make, params)
            bound = 1.05 * (2 * params_bytes + 1.5 * largest)
            ours, theirs = device_bytes(offloaded), device_bytes(on_device)
            rows.append(
                {
                    "tree": tree_name,
                    "num_params": n,
                    "setting": name,
                    "state_bytes_per_param": adam_jax.state_bytes(state) / n,
                    "largest_leaf_state_bytes_per_param": largest / n,
                    "device_bytes_per_param": theirs["total"] / n,
                    "offloaded_device_bytes_per_param": ours["total"] / n,
                    "offloaded_temporaries_per_param": ours["temporaries"] / n,
                    "bound_bytes_per_param": bound / n,
                    "within_bound": ours["total"] <= bound,
                    "memory_analysis": analysis(on_device),
                    "offloaded_memory_analysis": analysis(offloaded),
                }
            )
            print(
                f"  {tree_name:16s} {name:16s} device {theirs['total'] / n:6.2f} B/param, "
                f"offloaded {ours['total'] / n:6.2f} (bound {bound / n:.2f})",
                flush=True,
            )
    return rows


def analysis(compiled: jax.stages.Compiled) -> dict[str, int]:
    """``compiled.memory_analysis()``'s byte counts, by field name."""
    stats = compiled.memory_analysis()
    return {
        name: int(getattr(stats, name))
        for name in dir(stats)
        if name.endswith("_in_bytes") and isinstance(getattr(stats, name), int)
    }


def largest_leaf_state(make: Callable[[], optax.GradientTransformation], params: Any) -> int:
    """The bytes of the state of the param leaf whose state is largest (its state alone)."""
    tx = make()
    return max(
        adam_jax.state_bytes(jax.eval_shape(tx.init, {"leaf": leaf}))
        for leaf in jax.tree.leaves(params)
    )


#: The offloaded train step's options timed on a GPU beside the default's: the state in the
#: order the backward pass computes the gradients, four leaves ahead.
GRADIENT_ORDER_PREFETCH = 4


def time_rows(repeats: int, layers: int, rows: list[Row] | None = None) -> list[Row]:
    """The optimizer step of each :data:`TIMED` setting on the device and offloaded, on the
    transformer-like tree of ``layers`` blocks (on a GPU, :data:`GPU_TREE`), and on a GPU the
    whole train step of float32 AdamW, offloaded as by default and in the gradients' order
    (:func:`adam_jax.gradient_order`, with a prefetch of :data:`GRADIENT_ORDER_PREFETCH`
    leaves); appended to ``rows`` as each is made."""
    rows = [] if rows is None else rows
    on_gpu = jax.default_backend() == "gpu"
    sizes = GPU_TREE if on_gpu else {"layers": layers}
    base = transformer_params(jax.random.key(0), **sizes)
    n = sum(x.size for x in jax.tree.leaves(base))
    tree = "transformer, 98M" if on_gpu else "transformer-like"
    grads = jax.tree.map(lambda x: jnp.cos(x) * 1e-2, base)
    pairs = [(tree, name, SETTINGS[name], {}, adam_step, grads) for name in TIMED]
    if on_gpu:
        tokens = jax.random.randint(jax.random.key(1), GPU_BATCH, 0, GPU_TREE["vocab"])
        train = functools.partial(tree_train_step, loss=transformer_loss)
        ordered = {
            "leaf_order": adam_jax.gradient_order(transformer_loss, base, tokens),
            "prefetch": GRADIENT_ORDER_PREFETCH,
        }
        adamw = SETTINGS["float32 AdamW"]
        pairs.append((f"{tree}, train step", "float32 AdamW", adamw, {}, train, tokens))
        pairs.append(
            (
                f"{tree}, train step",
                f"float32 AdamW, gradient order, prefetch={GRADIENT_ORDER_PREFETCH}",
                adamw,
                ordered,
                train,
                tokens,
            )
        )
    for tree_name, name, make, options, make_step, batch in pairs:
        device, offloaded, ratio, repeated = _timed_pair(
            [make(), adam_jax.offload_state(make(), **options)], make_step, base, batch, repeats
        )
        rows.append(
            {
                "tree": tree_name,
                "num_params": n,
                "setting": name,
                "device_median_ms": device,
                "offloaded_median_ms": offloaded,
                "ratio_vs_device": ratio,
                "repeats": repeated,
            }
        )
        print(
            f"  {tree_name:28s} {name:16s} {device:8.3f} ms, offloaded {offloaded:8.3f} ms  "
            f"x{ratio:.3f}",
            flush=True,
        )
    return rows


def _timed_pair(
    pair: list[optax.GradientTransformation],
    make_step: Callable[[optax.GradientTransformation], Any],
    base: Any,
    batch: Any,
    repeats: int,
) -> tuple[float, float, float, int]:
    """The steps of two optimizers on copies of ``base``, timed in the same rounds: their
    medians in ms, the median over rounds of the second's time over the first's, and the
    rounds."""
    runners = []
    for k, tx in enumerate(pair):
        params = copy_tree(base)
        runners.append(Runner(str(k), make_step(tx), params, batch, tx.init(params)))
    interleaved(runners, repeats)
    first, second = runners
    ratio = statistics.median(b / a for a, b in zip(first.times, second.times, strict=True))
    medians = 1e3 * first.median, 1e3 * second.median, ratio, len(first.times)
    for runner in runners:
        runner.release()
    return medians


def slice_time_rows(
    repeats: int, shape: tuple[int, ...] = SLICED_LEAF, rows: list[Row] | None = None
) -> list[Row]:
    """The offloaded 8-bit step of one leaf of ``shape`` (GPT-2's embedding) whole and in
    slices of :data:`SLICE_ELEMENTS`, in the same rounds; appended to ``rows``."""
    rows = [] if rows is None else rows
    base = {"embedding": jax.random.normal(jax.random.key(0), shape) * 0.02}
    grads = jax.tree.map(lambda x: jnp.cos(x) * 1e-2, base)
    pair = [
        adam_jax.offload_state(SETTINGS[name]()) for name in ("8-bit moments", "8-bit, in slices")
    ]
    whole, sliced, ratio, repeated = _timed_pair(pair, adam_step, base, grads, repeats)
    rows.append(
        {
            "tree": f"one {shape[0]} x {shape[1]} leaf",
            "num_params": int(np.prod(shape)),
            "setting": "8-bit moments, offloaded, in slices",
            "slice_elements": SLICE_ELEMENTS,
            "whole_median_ms": whole,
            "sliced_median_ms": sliced,
            "ratio_vs_whole": ratio,
            "repeats": repeated,
        }
    )
    print(
        f"  one {shape} leaf, 8-bit offloaded: whole {whole:8.3f} ms, in slices {sliced:8.3f} ms "
        f" x{ratio:.3f}",
        flush=True,
    )
    return rows


def run(settings: Settings) -> list[Row]:
    trees = ("transformer-like",) if settings.quick else tuple(TREES)
    # The step times first, then the device bytes, the compressed settings last: on a lent
    # GPU the compressed steps at GPT-2 small's shapes take minutes to compile.
    time_rows(settings.repeats_or(REPEATS), 2 if settings.quick else 16, settings.finished)
    shape = (3 * SLICE_ELEMENTS // 1000, 1000) if settings.quick else SLICED_LEAF
    slice_time_rows(settings.repeats_or(REPEATS), shape, settings.finished)
    memory_rows(trees, settings.finished)
    return list(settings.finished)
