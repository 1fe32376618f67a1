"""SOAP's blocks spread over devices (``block_axis``), on 8 host devices (conftest's XLA_FLAGS).

* Training on a mesh of 8 (replicated params, FSDP-sharded params, ZeRO-1 state; Explicit and
  Auto axes) gives the single-device updates to float32 rounding, and every block's factors and
  bases are the single device's (read from the spread layout by ``SoapLayout.unpack_blocks``).
* Per device the factors and bases hold 1/8 of their single-device bytes where the blocks
  split evenly, the compiled step's per-device FLOPs (XLA's cost analysis: the blocks'
  products; ``eigh`` and QR are custom calls it does not count) at most 1/6 of the
  single-device step's. Blocks that do not split evenly are placed too (some devices own one
  more).
* Bad combinations are refused by name; the spread step exports for GPU and TPU.
* Two processes of 4 devices each (``jax.distributed``, ``soap_spread_worker.py``) train as
  one device does, each device holding 1/8 of the factors and bases.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax
from adam_jax._src.variants.soap import SoapLayout
from adam_jax.sharding import state_shardings
from examples.common.launch import free_port

DEVICES = 8
STEPS = 6
if jax.device_count() < DEVICES:
    pytest.skip("needs 8 host devices (XLA_FLAGS in conftest)", allow_module_level=True)

AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
# Blocks of 16: w1 has 4 x 8 = 32 (4 per device), w2 8 x 2 = 16 (2 each), the vector none.
EVEN = {"w1": (64, 128), "w2": (128, 32), "b": (128,)}
# w1 has 3 x 3 = 9 blocks of two shapes (16 x 16 and the 16 x 8 / 8 x 16 / 8 x 8 edges).
UNEVEN = {"w1": (40, 40), "w2": (40, 8)}
OPTIONS = {"block_size": 16, "precondition_frequency": 2, "weight_decay": 0.0}


def _tree(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _train(
    shapes: dict[str, tuple[int, ...]],
    mesh: Any = None,
    fsdp: bool = False,
    zero1: bool = False,
    traced_frequency: bool = False,
    **options: Any,
) -> tuple[list[dict[str, np.ndarray]], Any, Any]:
    """STEPS updates of soap on fixed gradients (``options`` over :data:`OPTIONS`; with
    ``traced_frequency``, ``precondition_frequency`` injected as an array): on one device, or
    spread over ``mesh``."""
    params = _tree(shapes, 0)
    grads = [_tree(shapes, 1 + i) for i in range(STEPS)]
    context = contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
    with context:
        options = OPTIONS | {"block_axis": None if mesh is None else "data"} | options
        if traced_frequency:
            static = tuple(k for k in options if k != "precondition_frequency")
            tx = optax.inject_hyperparams(adam_jax.soap, static_args=static)(1e-2, **options)
        else:
            tx = adam_jax.soap(1e-2, **options)
        if mesh is not None:
            specs = {k: P(None, "data") if fsdp and len(s) == 2 else P() for k, s in shapes.items()}
            params = {
                k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()
            }
        shardings = state_shardings(tx, params, mesh) if zero1 else None
        state = jax.jit(tx.init, out_shardings=shardings)(params)
        step = jax.jit(tx.update)
        updates = []
        for g in grads:
            if mesh is not None:
                g = {k: jax.device_put(v, params[k].sharding) for k, v in g.items()}
            u, state = step(g, state, params)
            updates.append({k: np.asarray(v) for k, v in u.items()})
    return updates, state[0], tx


def _mesh(axis_type: str) -> Any:
    return jax.make_mesh((DEVICES,), ("data",), axis_types=(AXIS_TYPES[axis_type],))


def _assert_close(ours: list[dict], want: list[dict]) -> None:
    for step, (u, w) in enumerate(zip(ours, want, strict=True)):
        for k in w:
            np.testing.assert_allclose(u[k], w[k], rtol=1e-6, atol=1e-7, err_msg=f"{k}@{step}")


def _layout(spread: bool) -> SoapLayout:
    axis = "data" if spread else None
    return SoapLayout(
        10000, merge_dims=False, precondition_1d=False, block_size=16, block_axis=axis
    )


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("placement", ["replicated", "fsdp", "zero1"])
def test_spread_blocks_train_as_one_device(axis_type: str, placement: str) -> None:
    want, single, _ = _train(EVEN)
    mesh = _mesh(axis_type)
    ours, state, _ = _train(EVEN, mesh, fsdp=placement == "fsdp", zero1=placement == "zero1")
    _assert_close(ours, want)
    for name in ("gg", "q"):
        for k, shape in EVEN.items():
            with jax.set_mesh(mesh):
                spread = _layout(True).unpack_blocks(np.asarray(getattr(state, name)[k]), shape)
            whole = _layout(False).unpack_blocks(np.asarray(getattr(single, name)[k]), shape)
            assert len(spread) == len(whole)
            for a, b in zip(spread, whole, strict=True):
                for x, y in zip(a, b, strict=True):
                    assert (x is None) == (y is None)
                    if x is not None:
                        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("placement", ["replicated", "zero1"])
def test_stacked_blocks_spread_train_as_one_device(axis_type: str, placement: str) -> None:
    """``stack_blocks=True`` with ``block_axis``: w1's 32 and w2's 16 blocks make one stack of
    48, dealt out 6 a device; the updates are one device's leaf by leaf, and each device holds
    an eighth of the stack's factors and bases."""
    want, _, _ = _train(EVEN)
    ours, state, _ = _train(EVEN, _mesh(axis_type), zero1=placement == "zero1", stack_blocks=True)
    _assert_close(ours, want)
    for name in ("gg", "q"):
        stored = getattr(state.stacks, name)["16x16"]
        assert set(stored) == {"dim0", "dim1"}
        for matrices in stored.values():
            assert matrices.shape == (48, 16, 16)
            assert {shard.data.shape for shard in matrices.addressable_shards} == {(6, 16, 16)}


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_blocks_spread_over_two_axes_train_as_one_device(axis_type: str) -> None:
    """``block_axis=("data", "fsdp")`` on a 2 x 4 mesh: the blocks dealt out over all 8
    devices, an eighth of the factors and bases on each, the updates one device's."""
    want, single, _ = _train(EVEN)
    types = (AXIS_TYPES[axis_type],) * 2
    mesh = jax.make_mesh((2, DEVICES // 2), ("data", "fsdp"), axis_types=types)
    ours, state, _ = _train(EVEN, mesh, block_axis=("data", "fsdp"))
    _assert_close(ours, want)
    whole = sum(leaf.nbytes for leaf in jax.tree.leaves((single.gg, single.q)))
    assert adam_jax.device_state_bytes((state.gg, state.q)) * DEVICES == whole


def test_a_device_holds_and_computes_an_eighth_of_the_blocks() -> None:
    _, single, tx_single = _train(EVEN)
    mesh = _mesh("explicit")
    _, state, tx = _train(EVEN, mesh)
    whole = sum(leaf.nbytes for leaf in jax.tree.leaves((single.gg, single.q)))
    assert adam_jax.device_state_bytes((state.gg, state.q)) * DEVICES == whole
    params = _tree(EVEN, 0)
    single_flops = (
        jax.jit(tx_single.update).lower(params, tx_single.init(params), params).compile()
    ).cost_analysis()["flops"]
    with jax.set_mesh(mesh):
        placed = jax.device_put(params, NamedSharding(mesh, P()))
        compiled = jax.jit(tx.update).lower(placed, jax.jit(tx.init)(placed), placed).compile()
    assert compiled.cost_analysis()["flops"] <= single_flops / 6


@pytest.mark.parametrize(
    ("shapes", "traced_frequency"),
    [(EVEN, False), (UNEVEN, False), (UNEVEN, True)],
    ids=["even", "uneven", "uneven_traced_frequency"],
)
def test_staggered_spread_blocks_refresh_as_on_one_device(
    shapes: dict, traced_frequency: bool
) -> None:
    # Every third step a block's turn: the devices' first blocks fall at different offsets.
    options = {"stagger_refresh": True, "precondition_frequency": 3}
    want, _, _ = _train(shapes, traced_frequency=traced_frequency, **options)
    ours, _, _ = _train(shapes, _mesh("explicit"), traced_frequency=traced_frequency, **options)
    _assert_close(ours, want)


def test_blocks_that_do_not_split_evenly_are_placed() -> None:
    want, _, _ = _train(UNEVEN)
    mesh = _mesh("explicit")
    ours, state, _ = _train(UNEVEN, mesh)
    _assert_close(ours, want)
    # w1: groups of 4, 2, 2 and 1 blocks, one slot each per device (most of them empty).
    with jax.set_mesh(mesh):
        layout = _layout(True)
        assert layout.placement(UNEVEN["w1"]) == (DEVICES, (1, 1, 1, 1))
        assert state.gg["w1"].shape == (layout.size(UNEVEN["w1"]),)
        assert state.gg["w1"].sharding.spec == P("data")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block_axis": "data"}, "give block_size too"),
        ({"block_axis": "", "block_size": 4}, "block_axis must be None, the name"),
        ({"block_axis": 0, "block_size": 4}, "block_axis must be None, the name"),
        ({"block_axis": (), "block_size": 4}, "or a tuple of distinct names"),
        ({"block_axis": ("data", "data"), "block_size": 4}, "or a tuple of distinct names"),
    ],
)
def test_bad_block_axis_is_refused_by_name(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        adam_jax.soap(1e-2, **options)


def test_a_block_axis_the_mesh_lacks_is_refused_at_init() -> None:
    tx = adam_jax.soap(1e-2, block_size=16, block_axis="model")
    with pytest.raises(ValueError, match="block_axis 'model' must name axes of the mesh"):
        tx.init(_tree(EVEN, 0))
    with jax.set_mesh(_mesh("explicit")), pytest.raises(ValueError, match="axes \\('data',\\)"):
        tx.init(_tree(EVEN, 0))


def test_spread_step_exports_for_gpu_and_tpu() -> None:
    mesh = _mesh("explicit")
    with jax.set_mesh(mesh):
        tx = adam_jax.soap(1e-2, block_axis="data", **OPTIONS)
        params = jax.device_put(_tree(EVEN, 0), NamedSharding(mesh, P()))
        state = jax.jit(tx.init)(params)
        exported = jax.export.export(jax.jit(tx.update), platforms=["cuda", "tpu"])(
            params, state, params
        )
    assert exported.platforms == ("cuda", "tpu")
    assert "qr" in exported.mlir_module().lower() or "geqrf" in exported.mlir_module().lower()


def test_two_processes_spread_blocks_as_one_device() -> None:
    worker = Path(__file__).with_name("soap_spread_worker.py")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    env.pop("XLA_FLAGS")  # the worker asks for its 4 devices
    port = str(free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, str(worker), str(i), port],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-2000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    for result in results:
        assert result["devices"] == DEVICES
        assert result["difference"] <= 1e-6
        assert result["fullest"] * DEVICES == result["single"]
