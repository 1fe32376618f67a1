"""The steps :mod:`benchmarks.accelerators` compiles: every optimizer of the registry, the
moment storages, flat params, state in host memory, stepping in slices and ZeRO-1, on a small
transformer-like tree or at GPT-2 small's shapes.

Each program is the jitted optimizer step ``(params, grads, state) -> (params, state)``
(:func:`benchmarks.harness.adam_step`) with its params and state donated, as a training step
holds them. Import it after :func:`benchmarks.accelerators.enable`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

import adam_jax
from benchmarks import accelerators, time_model
from benchmarks.harness import LR, adam_step
from benchmarks.hlo_program import read_program, transfer_overlap
from benchmarks.models import abstract_flat_params, gpt2_small_shapes, transformer_params
from benchmarks.sections import offload


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one program is built: its optimizer, its params' dtype and where things live."""

    make: Callable[[], optax.GradientTransformation]
    param_dtype: Any = jnp.float32
    layout: str = "tree"  # "tree", "flat" (FlatParams), "zero1" (2 devices)
    in_slices: bool = False  # step_in_slices, at the tree's slice size
    offload: bool = False  # offload_state, the state in host memory
    leaf_by_leaf: bool = True  # offload_state's options
    prefetch: int = 0


#: Options a registry optimizer needs on these trees (their attention kernels merge the heads).
REGISTRY_OPTIONS: dict[str, dict[str, Any]] = {"adam_mini": {"num_heads": 4}}


def _registry_settings() -> dict[str, Setting]:
    return {
        name: Setting(
            lambda name=name: adam_jax.registry.create(name, **REGISTRY_OPTIONS.get(name, {}))
        )
        for name in adam_jax.registry.names()
    }


def _adamw() -> optax.GradientTransformation:
    return adam_jax.adamw(LR)


def _adamw_8bit() -> optax.GradientTransformation:
    return adam_jax.adamw_8bit(LR)


def _adamw_8bit_fused() -> optax.GradientTransformation:
    """8-bit AdamW whose leaves take the fused Pallas kernel on a GPU (``kernel="auto"``)."""
    storages = adam_jax.eight_bit_moments()
    return adam_jax.adamw(
        LR, **{name: dataclasses.replace(s, kernel="auto") for name, s in storages.items()}
    )


def _four_bit() -> optax.GradientTransformation:
    return adam_jax.adamw(LR, **adam_jax.four_bit_moments())


SETTINGS: dict[str, Setting] = {
    "optax.adamw": Setting(lambda: optax.adamw(LR)),
    **_registry_settings(),
    "4-bit moments": Setting(_four_bit),
    "bfloat16 + Kahan": Setting(
        lambda: adam_jax.kahan_summation(_adamw()), param_dtype=jnp.bfloat16
    ),
    "bfloat16 + stochastic rounding": Setting(
        lambda: adam_jax.stochastic_rounding(_adamw(), key=0), param_dtype=jnp.bfloat16
    ),
    "adamw, FlatParams": Setting(_adamw, layout="flat"),
    "adamw_8bit, FlatParams": Setting(_adamw_8bit, layout="flat"),
    "4-bit moments, FlatParams": Setting(_four_bit, layout="flat"),
    "adamw_8bit, fused kernel": Setting(_adamw_8bit_fused),
    "step_in_slices(adamw_8bit)": Setting(_adamw_8bit, in_slices=True),
    "offload_state(adamw)": Setting(_adamw, offload=True),
    "offload_state(adamw, prefetch=1)": Setting(_adamw, offload=True, prefetch=1),
    "offload_state(adamw_8bit)": Setting(_adamw_8bit, offload=True),
    "offload_state(step_in_slices(adamw_8bit))": Setting(_adamw_8bit, in_slices=True, offload=True),
    "ZeRO-1 adamw, 2 devices": Setting(_adamw, layout="zero1"),
    "ZeRO-1 adamw_8bit, 2 devices": Setting(_adamw_8bit, layout="zero1"),
}


def small_tree() -> Any:
    """A one-block transformer-like tree (d = 64, 17 leaves, 59k params)."""
    return jax.eval_shape(lambda: transformer_params(jax.random.key(0), layers=1))


TREES: dict[str, Callable[[], Any]] = {"small": small_tree, "gpt2": gpt2_small_shapes}
#: ``step_in_slices``' most elements at once on each tree: its largest leaves take 4 slices
#: (small) or one slice a million elements (GPT-2's, as the memory figures are taken).
SLICE_ELEMENTS = {"small": 4096, "gpt2": 1 << 20}


def names() -> list[str]:
    return list(SETTINGS)


def transformation(setting: Setting, tree: str) -> optax.GradientTransformation:
    """The optimizer of ``setting``, wrapped as it asks (in slices, its state offloaded)."""
    tx = setting.make()
    if setting.in_slices:
        tx = adam_jax.step_in_slices(tx, SLICE_ELEMENTS[tree])
    if setting.offload:
        tx = adam_jax.offload_state(
            tx, leaf_by_leaf=setting.leaf_by_leaf, prefetch=setting.prefetch
        )
    return tx


class Step(NamedTuple):
    """A step to compile: the function, its placed arguments ``(params, grads, state)``, its
    output shardings (or None) and which arrays of which arguments are in host memory (the
    state's that ``offload_state`` offloads)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    out_shardings: Any
    host_leaves: dict[int, list[bool]]

    def compile(self) -> accelerators.Compiled:
        """Compiled with its params and state donated."""
        return accelerators.compile_for(
            self.fn, self.args, (0, 2), self.out_shardings, host_leaves=self.host_leaves
        )


def step_args(setting: Setting, tree: str, target: accelerators.Target) -> Step:
    """The step of ``setting`` on ``tree`` for ``target``."""
    tx = transformation(setting, tree)
    params = TREES[tree]()
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, setting.param_dtype), params)
    if setting.layout == "flat":
        params = abstract_flat_params(params)
    if setting.layout == "zero1":
        mesh = jax.sharding.Mesh(np.array(accelerators.devices(target, 2)), ("data",))
        replicated = NamedSharding(mesh, PartitionSpec())
        params = accelerators.placed(params, replicated)
        state_shardings = adam_jax.sharding.state_shardings(tx, params, mesh)
        state = accelerators.placed(jax.eval_shape(tx.init, params), state_shardings)
        param_shardings = jax.tree.map(lambda _: replicated, params)
        return Step(adam_step(tx), (params, params, state), (param_shardings, state_shardings), {})
    device = SingleDeviceSharding(accelerators.devices(target)[0])
    params = accelerators.placed(params, device)
    state = jax.eval_shape(tx.init, params)
    # The topology's device has no memories, so the state is marked host memory at the
    # compile (accelerators.compile_for), not by its sharding.
    state = accelerators.placed(state, device)
    host = {2: offload.host_leaves(tx, params)} if setting.offload else {}
    return Step(adam_step(tx), (params, params, state), None, host)


def largest_leaf_state_bytes(setting: Setting, tree: str) -> int:
    """The bytes of the largest param's share of ``setting``'s optimizer state on ``tree``
    (each array of a part of the state laid out like the params: moments, codes, scales)."""
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, setting.param_dtype), TREES[tree]()
    )
    treedef = jax.tree.structure(params)

    def like_params(node: Any) -> bool:
        try:
            treedef.flatten_up_to(node)
        except (ValueError, TypeError):
            return False
        return True

    shares = np.zeros(treedef.num_leaves, np.int64)
    state = jax.eval_shape(setting.make().init, params)
    for part in jax.tree.leaves(state, is_leaf=like_params):
        if like_params(part):
            shares += [
                sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(leaf))
                for leaf in treedef.flatten_up_to(part)
            ]
    return int(shares.max())


def report(name: str, tree: str, target: accelerators.Target) -> dict[str, Any]:
    """One row: what the program of ``name`` on ``tree`` compiled for ``target`` launches."""
    params = TREES[tree]()
    row: dict[str, Any] = {
        "program": name,
        "tree": tree,
        "target": target.name,
        "num_leaves": len(jax.tree.leaves(params)),
        "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
    }
    try:
        compiled = step_args(SETTINGS[name], tree, target).compile()
    except Exception as error:  # noqa: BLE001  (a program that does not compile is a finding)
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        return row
    program = read_program(compiled.text)
    summary = program.summary()
    overlap = transfer_overlap(compiled.text)
    moved = sum(size for size, _ in overlap)
    row.update(
        kernels=summary["kernels"],
        fusions=summary["fusions"],
        custom_calls=summary["custom_calls"],
        while_loops=len(program.loops),
        unknown_trip_loops=program.unknown_trip_loops,
        conditionals=[[b["kernels"] for b in c["branches"]] for c in summary["conditionals"]],
        copies=summary["copies"],
        host_transfers=summary["host_transfers"],
        host_kernels=summary["host_kernels"],
        # The share of the bytes copied between host and device whose copy overlaps a kernel.
        transfers_overlapping=sum(size for size, k in overlap if k) / moved if moved else None,
        # What the kernels read and write, in bytes (the program reader's count).
        kernel_bytes=summary["kernel_bytes"],
        memory=compiled.memory,
        compile_s=round(compiled.compile_s, 3),
    )
    if target.name in time_model.CARDS:
        row["predicted_ms"] = round(1e3 * time_model.predict(program, target.name), 4)
    return row


def row_line(row: dict[str, Any]) -> str:
    head = f"{row['target']:5} {row['tree']:5} {row['program']:42}"
    if "error" in row:
        return f"{head} does not compile: {row['error']}"
    memory = row["memory"]
    return (
        f"{head} {row['kernels']:5} kernels {sum(row['custom_calls'].values()):3} calls "
        f"{row['while_loops']:2} loops ({row['unknown_trip_loops']} unknown) "
        f"{len(row['conditionals'])} conds {row['copies']:4} copies "
        f"{row['host_transfers']:4} host transfers {row['host_kernels']:4} host kernels "
        f"temp {memory['temporaries'] / 2**20:8.1f} MiB  {row['compile_s']:6.1f} s"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| target | tree | program | kernels | custom calls | loops (unknown trips) | "
        "branches' kernels | copies | host transfers / kernels on host | temporaries MiB | "
        "compile s | model ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            error = row["error"].split("INTERNAL: ")[-1].split("]: ")[-1]
            lines.append(
                f"| {row['target']} | {row['tree']} | {row['program']} | does not compile: "
                f"`{error[:90]}` |||||||||"
            )
            continue
        calls = ", ".join(f"{k} {v}" for k, v in row["custom_calls"].items()) or "-"
        branches = "; ".join("/".join(map(str, c)) for c in row["conditionals"]) or "-"
        lines.append(
            f"| {row['target']} | {row['tree']} | {row['program']} | {row['kernels']} | {calls} "
            f"| {row['while_loops']} ({row['unknown_trip_loops']}) | {branches} | "
            f"{row['copies']} | {row['host_transfers']} / {row['host_kernels']} | "
            f"{row['memory']['temporaries'] / 2**20:.1f} | {row['compile_s']:.1f} | "
            f"{row.get('predicted_ms', '-')} |"
        )
    return "\n".join(lines)
