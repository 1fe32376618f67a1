"""The ZeRO-1 train step exported with ``jax.export`` for GPU and TPU, on CPU.

A lowering that only breaks on an accelerator (a primitive without a CUDA or TPU rule, a
sharding the partitioner cannot express) shows up here without one: the sharded train step of
an 8-device mesh, with float32 and 8-bit moments and the ZeRO-1 state shardings of
``adam_jax.sharding.state_shardings``, is exported for ``("cuda", "tpu")`` from abstract
arguments, serialized and read back; exported for CPU as well, the read-back module runs here
and gives the jitted step's results. The same step with the state in host memory
(``adam_jax.offload_state``) exports with the host memory kind on the state.

Serialization needs the ``flatbuffers`` package (without it the serialization tests skip, or
fail under ``CI=true``). The exported function takes and returns flat lists of arrays, since
``jax.export`` serializes only the pytree nodes registered with it, and the optimizer states
are optax's NamedTuples (and adam_jax's ``QuantizedArray``), which are not.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from variants import VARIANTS

import adam_jax
from adam_jax import quantization
from adam_jax.sharding import state_shardings

if jax.device_count() < 8:
    pytest.skip(
        "needs 8 host devices (XLA_FLAGS set in conftest before jax import)",
        allow_module_level=True,
    )

ACCELERATORS = ("cuda", "tpu")
OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adamw": lambda: adam_jax.adamw(1e-3, weight_decay=0.1),
    "adamw_8bit": lambda: adam_jax.adamw_8bit(1e-3, weight_decay=0.1),
    **{v.name: functools.partial(v.make_decaying, None) for v in VARIANTS},
    # SPAM's sparse moments: sorting, gathers and scatters of the sampled entries.
    "spam_sparse": lambda: adam_jax.spam(1e-3, density=0.25, delta_t=4, weight_decay=0.1),
}
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def _require_flatbuffers() -> None:
    if importlib.util.find_spec("flatbuffers") is None:
        message = "jax.export serialization needs flatbuffers (pip install flatbuffers)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def _loss(params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = batch
    return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)


def _abstract_args(mesh: Mesh, tx: optax.GradientTransformation) -> tuple[Any, Any, Any]:
    """Replicated params (``w`` has 8-bit moments: 8192 >= 4096 elements), the ZeRO-1 state,
    a batch sharded over the data axis: ShapeDtypeStructs with their shardings."""
    replicated = NamedSharding(mesh, P())
    params = {
        "w": jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=replicated),
        "b": jax.ShapeDtypeStruct((128,), jnp.float32, sharding=replicated),
    }
    shardings = state_shardings(tx, params, mesh)
    state = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        jax.eval_shape(tx.init, params),
        shardings,
    )
    data = NamedSharding(mesh, P("data"))
    batch = (
        jax.ShapeDtypeStruct((32, 64), jnp.float32, sharding=data),
        jax.ShapeDtypeStruct((32, 128), jnp.float32, sharding=data),
    )
    return params, state, batch


def _flat_train_step(
    tx: optax.GradientTransformation, args: tuple[Any, Any, Any]
) -> Callable[..., Any]:
    """The jitted train step on the flat list of ``args``' leaves, returning the flat list of
    the new params' and state's leaves (shardings: the arguments')."""
    in_tree = jax.tree.structure(args)
    params, state, _ = args
    out_shardings = jax.tree.map(lambda leaf: leaf.sharding, jax.tree.leaves((params, state)))

    def flat_step(*leaves: jax.Array) -> list[jax.Array]:
        params, state, batch = jax.tree.unflatten(in_tree, leaves)
        grads = jax.grad(_loss)(params, batch)
        updates, state = tx.update(grads, state, params)
        return jax.tree.leaves((optax.apply_updates(params, updates), state))

    return jax.jit(flat_step, out_shardings=out_shardings)


def _mesh(axis_type: str) -> Mesh:
    return jax.make_mesh((8,), ("data",), axis_types=(AXIS_TYPES[axis_type],))


def _export(
    optimizer: str, axis_type: str, platforms: tuple[str, ...] = ACCELERATORS
) -> tuple[jax.export.Exported, Mesh, tuple[Any, Any, Any]]:
    mesh = _mesh(axis_type)
    tx = OPTIMIZERS[optimizer]()
    args = _abstract_args(mesh, tx)
    with jax.set_mesh(mesh):
        exported = jax.export.export(_flat_train_step(tx, args), platforms=platforms)(
            *jax.tree.leaves(args)
        )
    return exported, mesh, args


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_zero1_train_step_exports_for_cuda_and_tpu(optimizer: str, axis_type: str) -> None:
    exported, mesh, args = _export(optimizer, axis_type)
    leaves = jax.tree.leaves(args)

    assert exported.platforms == ACCELERATORS
    assert exported.nr_devices == 8
    assert [(a.shape, a.dtype) for a in exported.in_avals] == [(x.shape, x.dtype) for x in leaves]
    # The state goes in and out with its ZeRO-1 shardings (the params replicated).
    num_params = len(jax.tree.leaves(args[0]))
    num_state = len(jax.tree.leaves(args[1]))
    for leaf, shard_in, shard_out in zip(
        leaves[: num_params + num_state],
        exported.in_shardings_jax(mesh),
        exported.out_shardings_jax(mesh),
        strict=False,
    ):
        assert shard_in.is_equivalent_to(leaf.sharding, len(leaf.shape))
        assert shard_out.is_equivalent_to(leaf.sharding, len(leaf.shape))
    moments = [x for x in leaves[num_params : num_params + num_state] if x.size >= 8]
    assert moments and all(not x.sharding.is_fully_replicated for x in moments)
    stored = jax.tree.leaves(args[1], is_leaf=quantization.is_quantized)
    assert any(quantization.is_quantized(x) for x in stored) == (optimizer == "adamw_8bit")


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_exported_zero1_train_step_serializes(optimizer: str, axis_type: str) -> None:
    _require_flatbuffers()
    exported, mesh, _ = _export(optimizer, axis_type)
    restored = jax.export.deserialize(exported.serialize())

    assert restored.platforms == ACCELERATORS
    assert restored.in_avals == exported.in_avals
    assert restored.out_avals == exported.out_avals
    for restored_shardings, exported_shardings, avals in (
        (restored.in_shardings_jax(mesh), exported.in_shardings_jax(mesh), exported.in_avals),
        (restored.out_shardings_jax(mesh), exported.out_shardings_jax(mesh), exported.out_avals),
    ):
        for a, b, aval in zip(restored_shardings, exported_shardings, avals, strict=True):
            assert a.is_equivalent_to(b, aval.ndim)
    assert restored.mlir_module() == exported.mlir_module()


def test_exported_zero1_train_step_runs_on_cpu_as_jitted() -> None:
    """Exported for CPU as well as the accelerators (8-bit moments, ``Explicit`` axes), read
    back, and run: the results of the jitted step, up to float32 rounding (the module compiles
    on its own, with the platform index as an extra argument, and XLA may fuse it
    differently)."""
    _require_flatbuffers()
    exported, mesh, args = _export("adamw_8bit", "explicit", ("cpu", *ACCELERATORS))
    tx = OPTIMIZERS["adamw_8bit"]()
    step = _flat_train_step(tx, args)
    restored = jax.export.deserialize(exported.serialize())

    params_sharding = args[0]
    keys = iter(jax.random.split(jax.random.key(0), 4))
    params = {
        name: jax.device_put(jax.random.normal(next(keys), p.shape), p.sharding)
        for name, p in params_sharding.items()
    }
    _, state, batch = args
    state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda x: x.sharding, state))(params)
    batch = tuple(jax.device_put(jax.random.normal(next(keys), x.shape), x.sharding) for x in batch)
    # One step first, so that the moments (and 8-bit scales) are not all zeros.
    leaves = jax.tree.leaves((params, state, batch))
    num_batch = len(batch)
    leaves = [*step(*leaves), *leaves[-num_batch:]]

    expected = step(*leaves)
    with jax.set_mesh(mesh):
        got = restored.call(*leaves)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_offloaded_train_step_exports_for_cuda_and_tpu(optimizer: str) -> None:
    """``adam_jax.offload_state`` on the ZeRO-1 step: the state goes in and comes out in host
    memory (``pinned_host`` on every large state argument and result of the module), the
    params, the batch and the small state arrays in device memory."""
    mesh = _mesh("explicit")
    tx = adam_jax.offload_state(OPTIMIZERS[optimizer]())
    args = _abstract_args(mesh, tx)
    with jax.set_mesh(mesh):
        exported = jax.export.export(_flat_train_step(tx, args), platforms=ACCELERATORS)(
            *jax.tree.leaves(args)
        )
    main = next(
        line for line in exported.mlir_module().splitlines() if "func.func public @main" in line
    )
    # Offloaded: the state's arrays of at least 4096 entries (offload_state's default
    # min_offloaded_size); the smaller ones stay on the device.
    sizes = [x.size for x in jax.tree.leaves(args[1])]
    large = sum(size >= 4096 for size in sizes)
    assert 0 < large < len(sizes)
    assert main.count('mhlo.memory_kind = "pinned_host"') == 2 * large  # in and out
    num_device = 2 * len(jax.tree.leaves(args[0])) + len(jax.tree.leaves(args[2]))
    small = len(sizes) - large
    assert main.count('mhlo.memory_kind = "device"') == num_device + 2 * small
