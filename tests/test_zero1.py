"""ZeRO-1 (``adam_jax.sharding``): the optimizer state sharded over the data axis.

On 8 host devices (``XLA_FLAGS`` in conftest): a 1-D ``("data",)`` mesh of 8 with replicated
params, and a 2-D ``("data", "model")`` mesh of 4 x 2 whose matrices are FSDP-sharded over
``"model"`` (gathered for the forward pass), each with ``Explicit`` and with ``Auto`` axes; adam,
adamw (mask and schedule), amsgrad, adamw with 8-bit moments, the modern variants and SPAM
with sparse moments.

* Per device the state holds 1/8 of its bytes on the 1-D mesh, and on the 2-D mesh 1/8 of the
  matrices' and 1/4 of the vectors' (replicated params: only the data axis splits them); the
  step counts and the moments of a 3-vector stay whole; 8-bit: up to the block scales.
* 10 train steps (batch sharded over the data axis) give bit for bit the params and state of
  the same steps with a replicated state (to float32 rounding for the variants that sum over
  a tensor, whose slices are summed in another order), and the params of an unsharded
  single-device run up to float32 rounding (LaProp's up to float64 rounding, in float64: its
  conditioning on this problem amplifies float32's, see ``FLOAT64_SINGLE_DEVICE``). Each
  optimizer trains with both axis types and on both meshes (the 8-bit one in all four
  combinations).
* The compiled step sums the gradients over the data axis and all-gathers every param, updated
  in slices, back into its own sharding (the replicated-state step on the 1-D mesh gathers
  nothing).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from variant_spec import ZERO1_LAYOUTS
from variants import PER_TENSOR, VARIANTS

import adam_jax
from adam_jax import quantization
from adam_jax.sharding import state_shardings, with_data_axis

DEVICES = 8
STEPS = 10

if jax.device_count() < DEVICES:
    pytest.skip(
        "needs 8 host devices (XLA_FLAGS set in conftest before jax import)",
        allow_module_level=True,
    )


def _matrices(params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim > 1, params)


SCHEDULE = optax.linear_schedule(1e-2, 1e-3, STEPS)
OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam": lambda: adam_jax.adam(1e-2),
    "adamw": lambda: adam_jax.adamw(SCHEDULE, weight_decay=0.1, mask=_matrices),
    "amsgrad": lambda: adam_jax.amsgrad(1e-2),
    "adamw_8bit": lambda: adam_jax.adamw_8bit(SCHEDULE, weight_decay=0.1),
    # The modern Adam family, with weight decay on the matrices where the variant has it.
    **{v.name: functools.partial(v.make_decaying, _matrices) for v in VARIANTS},
    # SPAM's sparse moments: vectors of sampled entries of the matrices, redrawn every 4 steps.
    "spam_sparse": lambda: adam_jax.spam(
        1e-2, density=0.25, delta_t=4, warmup_steps=2, weight_decay=0.1, mask=_matrices
    ),
}
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
# Mesh name -> (shape, axis names, the params' specs: replicated, or FSDP over "model").
MESHES = {
    "data8": ((8,), ("data",), {}),
    "data4_model2": ((4, 2), ("data", "model"), {"w1": P("model"), "w2": P("model")}),
}


def _params(dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """An MLP: w1 is big enough for 8-bit moments (8192 >= 4096 elements), w2 is not, and
    ``scale`` has no dimension that 8 (or 4) divides. ``float64`` (under ``jax.enable_x64``):
    the same numbers, drawn in float32."""
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "w1": jax.random.normal(k1, (64, 128), jnp.float32) / 8,
        "b1": jnp.zeros(128, jnp.float32),
        "w2": jax.random.normal(k2, (128, 8), jnp.float32) / 11,
        "b2": jnp.zeros(8, jnp.float32),
        "scale": jnp.ones(3, jnp.float32),
    }
    return jax.tree.map(lambda p: p.astype(dtype), params)


def _batches(dtype: Any = jnp.float32) -> list[tuple[jax.Array, jax.Array]]:
    keys = jax.random.split(jax.random.key(1), 2 * STEPS)
    normal = functools.partial(jax.random.normal, dtype=jnp.float32)
    return [
        (
            normal(keys[2 * i], (32, 64)).astype(dtype),
            normal(keys[2 * i + 1], (32, 8)).astype(dtype),
        )
        for i in range(STEPS)
    ]


def _loss(params: Any, batch: tuple[jax.Array, jax.Array], mesh: Mesh | None) -> jax.Array:
    if mesh is not None:  # FSDP: gather the params for the forward pass
        params = jax.tree.map(lambda p: jax.sharding.reshard(p, NamedSharding(mesh, P())), params)
    x, y = batch
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2) * params["scale"].mean()


def _step(tx: optax.GradientTransformation, mesh: Mesh | None) -> Callable[..., Any]:
    def step(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
        grads = jax.grad(_loss)(params, batch, mesh)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _mesh(mesh_name: str, axis_type: str) -> tuple[Mesh, Any]:
    shape, names, specs = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, names, axis_types=(AXIS_TYPES[axis_type],) * len(shape))
    param_shardings = {k: NamedSharding(mesh, specs.get(k, P())) for k in _params()}
    return mesh, param_shardings


def _bytes_per_device(tree: Any) -> int:
    """The most bytes of ``tree``'s arrays that one device holds."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


def _train(
    tx: optax.GradientTransformation,
    mesh: Mesh,
    param_shardings: Any,
    shardings: Any,
    dtype: Any = jnp.float32,
) -> tuple[Any, Any, str]:
    """10 steps from the same params with the state in ``shardings``; the batch is sharded
    over the data axis. Returns the params, the state and the compiled step's HLO text."""
    fsdp = any(s.spec != P() for s in jax.tree.leaves(param_shardings))
    params = jax.device_put(_params(dtype), param_shardings)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    step = jax.jit(
        _step(tx, mesh if fsdp else None),
        donate_argnums=(0, 1),
        out_shardings=(param_shardings, shardings),
    )
    batches = jax.device_put(_batches(dtype), NamedSharding(mesh, P("data")))
    for batch in batches:
        params, state = step(params, state, batch)
    return params, state, step.lower(params, state, batches[0]).compile().as_text()


@functools.cache
def _single_device_params(optimizer: str, dtype: Any = jnp.float32) -> Any:
    tx = OPTIMIZERS[optimizer]()
    params = jax.device_put(_params(dtype), jax.devices()[0])
    state = jax.jit(tx.init)(params)
    step = jax.jit(_step(tx, None), donate_argnums=(0, 1))
    for batch in _batches(dtype):
        params, state = step(params, state, batch)
    return jax.device_get(params)


def _is_pair(x: Any) -> bool:
    return isinstance(x, tuple)


def _collective_results(hlo: str, op: str) -> list[str]:
    """The result types (``f32[32,128]{1,0}``, or a tuple of them) of the ``op`` instructions
    (``all-gather``, ``all-reduce``...) of a compiled HLO module."""
    return re.findall(rf"= (\S+|\([^)]*\)) {op}(?:-start)?\(", hlo)


def _gathers_into(hlo: str, shape: tuple[int, ...]) -> bool:
    """Whether some all-gather of ``hlo`` returns a float32 array of ``shape``."""
    wanted = "f32[" + ",".join(map(str, shape)) + "]"
    return any(wanted in result for result in _collective_results(hlo, "all-gather"))


# -- with_data_axis: the rule, one leaf at a time ----------------------------------------------

ABSTRACT_MESH = AbstractMesh((4, 2), ("data", "model"))


@pytest.mark.parametrize(
    ("spec", "shape", "expected"),
    [
        (P(), (6, 16), P(None, "data")),  # the first dimension 4 divides
        (P(), (8, 16), P("data", None)),
        (P(None, "model"), (16, 8), P("data", "model")),  # kept, data on a free dimension
        (P("model"), (8, 6), P("model")),  # no free dimension 4 divides
        (P("model"), (8,), P("model")),  # never joins "model" on one dimension
        (P("data"), (8, 8), P("data")),  # already over the data axis (FSDP over data)
        (P(), (3,), P()),  # too small to split
        (P(), (), P()),  # scalar (the step count)
        (P(), (0, 8), P(None, "data")),  # an empty dimension is not split
    ],
)
def test_with_data_axis_adds_the_data_axis_on_the_first_dimension_it_divides(
    spec: P, shape: tuple[int, ...], expected: P
) -> None:
    sharding = with_data_axis(NamedSharding(ABSTRACT_MESH, spec), shape)
    assert sharding.mesh == ABSTRACT_MESH
    assert sharding.is_equivalent_to(NamedSharding(ABSTRACT_MESH, expected), len(shape))


def test_with_data_axis_takes_another_axis_name() -> None:
    mesh = AbstractMesh((2, 4), ("model", "batch"))
    sharding = with_data_axis(NamedSharding(mesh, P()), (2, 8), data_axis="batch")
    assert sharding.spec == P(None, "batch")
    with pytest.raises(ValueError, match="'data' is not an axis"):
        with_data_axis(NamedSharding(mesh, P()), (8,))


# -- state_shardings: the whole state ----------------------------------------------------------


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_state_shardings_from_arrays_and_abstract_params_agree(axis_type: str) -> None:
    """Arrays, ShapeDtypeStructs with their shardings, and (for replicated params)
    ShapeDtypeStructs without one give the same shardings, a tree with the state's structure;
    the step counts stay replicated."""
    mesh, param_shardings = _mesh("data4_model2", axis_type)
    tx = OPTIMIZERS["adamw"]()
    params = jax.device_put(_params(), param_shardings)
    abstract = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), params
    )
    from_arrays = state_shardings(tx, params, mesh)
    assert jax.tree.structure(from_arrays) == jax.tree.structure(jax.eval_shape(tx.init, params))
    assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(from_arrays))
    assert from_arrays == state_shardings(tx, abstract, mesh)
    assert from_arrays[0].count.spec == P() and from_arrays[2].count.spec == P()
    assert from_arrays[0].mu["w1"].spec == P("model", "data")
    assert from_arrays[0].nu["b1"].spec == P("data")
    assert from_arrays[0].mu["scale"].is_fully_replicated

    unsharded = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), _params())
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), _params())
    assert state_shardings(tx, unsharded, mesh) == state_shardings(
        tx, jax.device_put(_params(), replicated), mesh
    )


def test_state_shardings_of_wrapped_optimizers_shard_every_params_like_tree() -> None:
    """Hyperparameters injected as state stay replicated; the gradient accumulator of
    ``optax.MultiSteps`` is sharded like the moments; the moments of flat params too."""
    mesh, _ = _mesh("data8", "auto")
    injected = optax.inject_hyperparams(adam_jax.adamw)(learning_rate=1e-3, weight_decay=0.1)
    shardings = state_shardings(injected, _params(), mesh)
    assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings.hyperparams))
    assert shardings.inner_state[0].mu["w1"].spec == P("data", None)

    accumulated = optax.MultiSteps(adam_jax.adam(1e-3), every_k_schedule=4)
    shardings = state_shardings(accumulated, _params(), mesh)
    assert shardings.acc_grads["w1"].spec == P("data", None)
    assert shardings.inner_opt_state[0].nu["b2"].spec == P("data")

    flat_params = adam_jax.flat.flatten({"w": jnp.zeros((16, 8)), "b": jnp.zeros(8)})
    shardings = state_shardings(adam_jax.adam(1e-3), flat_params, mesh)
    assert [s.spec for s in jax.tree.leaves(shardings[0].mu)] == [P("data")]


def test_zero1_takes_stochastic_rounding_on_explicit_axes() -> None:
    """ZeRO-1 splits stochastic rounding's raw key data like any vector; the step draws from
    the whole key and keeps the state's shardings."""
    eight, _ = _mesh("data8", "explicit")
    params = {"w": jnp.ones((16, 8), jnp.bfloat16), "b": jnp.zeros(8, jnp.bfloat16)}
    tx = adam_jax.stochastic_rounding(adam_jax.adamw(1e-3), key=jax.random.key(0))
    small = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), params)
    want, _ = tx.update(small, tx.init(params), params)
    shardings = state_shardings(tx, params, eight)
    assert shardings.key.is_fully_replicated  # 2 words, which 8 devices do not divide
    two = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:2])
    for mesh in (eight, two):
        shardings = state_shardings(tx, params, mesh)
        with jax.set_mesh(mesh):
            state = jax.jit(tx.init, out_shardings=shardings)(params)
            updates, state = jax.jit(tx.update, out_shardings=(None, shardings))(
                small, state, params
            )
        assert jax.tree.map(lambda x: x.sharding, state) == shardings
        jax.tree.map(np.testing.assert_array_equal, updates, want)
    assert shardings.key.spec == P("data")


def test_state_shardings_keeps_only_the_param_axes_that_divide_and_exist() -> None:
    mesh, _ = _mesh("data4_model2", "auto")
    uneven = jax.ShapeDtypeStruct((3, 8), jnp.float32, sharding=NamedSharding(mesh, P("model")))
    shardings = state_shardings(adam_jax.adam(1e-3), {"w": uneven}, mesh)
    assert shardings[0].mu["w"].spec == P(None, "data")

    other = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    elsewhere = jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(other, P("model")))
    with pytest.raises(ValueError, match="mesh axis 'model' of size 4"):
        state_shardings(adam_jax.adam(1e-3), {"w": elsewhere}, mesh)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_state_shardings_fit_the_8bit_layout_of_tensor_parallel_params(axis_type: str) -> None:
    """A param sharded on its last axis into shards of 100 elements (not whole blocks of 256):
    the 8-bit scales' shape depends on the mesh's axis types; the shardings fit the state
    that ``init`` makes on either, and one update keeps them."""
    mesh, _ = _mesh("data4_model2", axis_type)
    params = {"w": jax.device_put(jnp.ones((8, 200)), NamedSharding(mesh, P(None, "model")))}
    tx = adam_jax.adamw_8bit(1e-3, min_size=1024)
    shardings = state_shardings(tx, params, mesh)
    assert shardings[0].mu["w"].codes.spec == P("data", "model")
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    assert jax.tree.map(lambda x: x.sharding, state) == shardings
    update = jax.jit(tx.update, out_shardings=(None, shardings))
    _, state = update(jax.tree.map(lambda p: 1e-3 * p, params), state, params)
    assert jax.tree.map(lambda x: x.sharding, state) == shardings


def test_state_shardings_rejects_a_mesh_without_the_data_axis() -> None:
    mesh = jax.make_mesh((8,), ("batch",))
    with pytest.raises(ValueError, match="'data' is not an axis"):
        state_shardings(adam_jax.adam(1e-3), _params(), mesh)
    shardings = state_shardings(adam_jax.adam(1e-3), _params(), mesh, data_axis="batch")
    assert shardings[0].mu["w1"].spec == P("batch", None)


def _ways(leaf: jax.Array, mesh: Mesh) -> int:
    """Over how many devices ZeRO-1 splits a state leaf of these tests' model: a matrix (its
    param replicated, or FSDP-sharded over "model" on the 2-D mesh) over all 8, a vector over
    the data axis if its size divides it, anything smaller nowhere. A reduced moment (block
    means, factors: an axis of extent 1) is split like a vector: its param's sharding of the
    reduced axis is gone."""
    if leaf.ndim >= 2 and 1 not in leaf.shape:
        return DEVICES
    data = mesh.shape["data"]
    return data if leaf.size and leaf.size % data == 0 else 1


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_zero1_state_bytes_per_device(optimizer: str, axis_type: str, mesh_name: str) -> None:
    """On the 1-D mesh a device holds 1/8 of the state (the step counts and ``scale``'s moments
    aside, and per-tensor statistics); on the 2-D mesh 1/8 of the matrices' state and 1/4 of the
    vectors'. 8-bit moments: up to the block scales, which may split fewer ways than the codes."""
    mesh, param_shardings = _mesh(mesh_name, axis_type)
    tx = OPTIMIZERS[optimizer]()
    params = jax.device_put(_params(), param_shardings)
    state = jax.jit(tx.init, out_shardings=state_shardings(tx, params, mesh))(params)

    leaves = jax.tree.leaves(state)
    expected = sum(x.nbytes // _ways(x, mesh) for x in leaves)
    stored = jax.tree.leaves(state, is_leaf=quantization.is_quantized)
    scales = sum(x.absmax.nbytes for x in stored if quantization.is_quantized(x))
    assert (scales > 0) == (optimizer == "adamw_8bit")
    assert expected <= _bytes_per_device(state) <= expected + scales
    if mesh_name == "data8":
        small = sum(x.nbytes for x in leaves if x.size < DEVICES)
        # Besides those, one value per tensor (Stable-SPAM's norm statistics, of shape
        # (1,) * ndim) stays whole.
        statistics = sum(x.nbytes for x in leaves if x.size == 1 and x.ndim >= 1)
        assert small - statistics < 64
        assert expected == (sum(x.nbytes for x in leaves) - small) // 8 + small
    assert jax.tree.map(lambda p: p.sharding, params) == param_shardings


# The optimizers compared with the single-device run in float64 rather than float32. This
# problem has an element, w1[28, 22], whose first two summed gradients nearly cancel (1.5e-5 and
# -7e-6, 0.2% and 0.1% of the median |g|), so that float32 rounding of the sums is 1e-4 of them
# there, and every optimizer that divides by the root of the second moment (all of them, eps
# small against 1e-5) turns it into an error of the step: it is Adam's and AdamW's worst element
# too (0.39 and 0.41 of the tolerance between the layouts). LaProp's momentum keeps the
# gradients already divided, so the error of the second step stays in every later step
# (ZeRO-1 - single device: -6.1e-7 after 2 steps, -1.97e-6 after 10, 1.04 of the tolerance;
# Adam's stays at -8e-7 once the later gradients raise its second moment). In float64 the
# gradients perturbed by 1e-7 of the median |g| move that element of LaProp's params by 8.4e-7
# (Adam's 3.3e-7, the median element's 1.4e-9): the algorithm's conditioning on this problem,
# not its float32 arithmetic (fed the float64 gradients, LaProp's float32 run is 3.4e-7 from
# float64 there, Adam's 3.0e-7). Other trajectories (schedules) only move such an element
# elsewhere. The two layouts agree to 5e-15 in float64, which the tighter tolerance checks.
# SPAM, on the Auto data4_model2 mesh its turn gives it: w1[49, 92] ends 1.9e-6 from the
# single-device run in float32 (1.7 of the tolerance; every other element within it), and
# within 1e-10 in float64: the float32 rounding of the summed gradients, carried by its steps
# (not analysed further: its spike clip is a threshold, where rounding can decide the branch).
# Grams and StableAdamW, on the turn their rows give them (Auto data4_model2): Grams' w1[92, 5]
# ends 2.6e-6 from the single-device run (its update takes the sign of each gradient, which
# rounding flips near zero), StableAdamW's w1[28, 22] 2.1e-6 and w1[49, 92] 1.8e-6, in float32;
# float64 checks them to 1e-10. Each variant's row says whether it is compared so
# (``zero1_float64_single_device``).
FLOAT64_SINGLE_DEVICE = frozenset(v.name for v in VARIANTS if v.zero1_float64_single_device)

# The optimizers whose two layouts are compared to float32 rounding in float32 and to float64
# rounding (1e-13) in float64 (their rows' ``zero1_float64_layouts``). SPAM's step on the Auto
# data4_model2 mesh differs between the ZeRO-1 and the replicated state by an ulp or two: in
# float32 in 4 of b1's 128 entries after 10 steps (2e-7 relative; 5e-6 at a near-zero element),
# in float64 in one second-moment entry (1.8e-16): XLA:CPU rounds the clip and the moments'
# updates differently in the two fusions it picks (contracted multiply-adds), so the difference
# scales with the precision; the arithmetic is the same.
FLOAT64_LAYOUTS = frozenset(v.name for v in VARIANTS if v.zero1_float64_layouts)

# Each optimizer trains with both axis types and on both meshes, the 8-bit one in all four
# combinations (its stored form has leaves of other shapes than the params).
TRAINING_CASES = [
    *[
        (optimizer, *case)
        for optimizer, cases in {
            "adam": [("explicit", "data8"), ("auto", "data4_model2")],
            "adamw": [("auto", "data8"), ("explicit", "data4_model2")],
            "amsgrad": [("explicit", "data8"), ("auto", "data4_model2")],
        }.items()
        for case in cases
    ],
    *[("adamw_8bit", axis_type, mesh_name) for axis_type in AXIS_TYPES for mesh_name in MESHES],
    ("spam_sparse", "explicit", "data4_model2"),
    ("spam_sparse", "auto", "data8"),
    # Each variant on the axis types and mesh of its row (``Variant.zero1``): a new variant
    # moves no other to another mesh.
    *[(variant.name, *variant.zero1) for variant in VARIANTS],
]


def test_each_variant_trains_on_the_layout_of_its_row_whatever_the_other_names() -> None:
    """The (axis types, mesh) pairs of the rows are this module's, and a row without one gets
    one from its name alone: adding a variant moves no other."""
    assert set(ZERO1_LAYOUTS) == {(a, m) for a in AXIS_TYPES for m in MESHES}
    for variant in VARIANTS:
        assert variant.zero1 in ZERO1_LAYOUTS
        unset = dataclasses.replace(variant, zero1_layout=None)
        assert unset.zero1 == dataclasses.replace(unset, learning_rate=1.0).zero1
    names = ["adamod", "half_adam", "grams", "laprop", "zz"]
    chosen = {n: dataclasses.replace(VARIANTS[0], name=n, zero1_layout=None).zero1 for n in names}
    assert len(set(chosen.values())) > 1  # the checksum spreads names over the layouts


@pytest.mark.parametrize(("optimizer", "axis_type", "mesh_name"), TRAINING_CASES)
def test_zero1_training_matches_replicated_state_and_single_device(
    optimizer: str, axis_type: str, mesh_name: str
) -> None:
    mesh, param_shardings = _mesh(mesh_name, axis_type)
    tx = OPTIMIZERS[optimizer]()
    zero1_shardings = state_shardings(tx, jax.device_put(_params(), param_shardings), mesh)
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), zero1_shardings)

    params, state, hlo = _train(tx, mesh, param_shardings, zero1_shardings)
    replicated_params, replicated_state, replicated_hlo = _train(
        tx, mesh, param_shardings, replicated
    )

    # Only where the state lives changes, not the arithmetic; but a sum over a tensor (the
    # per-tensor rules' RMS or norms) adds its slices in another order: float32 rounding.
    same = (
        functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7)
        if optimizer in PER_TENSOR or optimizer in FLOAT64_LAYOUTS
        else np.testing.assert_array_equal
    )
    jax.tree.map(same, (params, state), (replicated_params, replicated_state))
    if optimizer in FLOAT64_LAYOUTS:
        with jax.enable_x64(True):
            zero1_64 = _train(tx, mesh, param_shardings, zero1_shardings, jnp.float64)[:2]
            replicated_64 = _train(tx, mesh, param_shardings, replicated, jnp.float64)[:2]
            assert jax.tree.leaves(zero1_64)[0].dtype == jnp.float64
            jax.tree.map(
                functools.partial(np.testing.assert_allclose, rtol=1e-13, atol=0),
                zero1_64,
                replicated_64,
            )
    assert jax.tree.map(lambda x: x.sharding, state) == zero1_shardings
    # The gradients are summed in another order than on one device: float32 rounding (float64
    # rounding, for the optimizers that amplify the rounding of this problem's gradients).
    if optimizer in FLOAT64_SINGLE_DEVICE:
        with jax.enable_x64(True):
            params64, _, _ = _train(tx, mesh, param_shardings, zero1_shardings, jnp.float64)
            assert params64["w1"].dtype == jnp.float64
            jax.tree.map(
                functools.partial(np.testing.assert_allclose, rtol=1e-10, atol=1e-12),
                jax.device_get(params64),
                _single_device_params(optimizer, jnp.float64),
            )
    else:
        jax.tree.map(
            functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
            jax.device_get(params),
            _single_device_params(optimizer),
        )
    # The gradients are summed over the data axis (an all-reduce, or a reduce-scatter), the
    # update runs on slices, and every param is all-gathered back into its own sharding.
    summed = _collective_results(hlo, "all-reduce") + _collective_results(hlo, "reduce-scatter")
    assert summed
    for param, sharding in jax.tree.leaves(
        jax.tree.map(lambda p, s: (p, s), _params(), param_shardings), is_leaf=_is_pair
    ):
        # SPAM's sparse matrices are updated whole: their sampled entries lie anywhere in the
        # param (their stored moments, vectors, still split over the data axis).
        sparse = optimizer == "spam_sparse" and param.ndim == 2
        if param.size >= DEVICES and not sparse:  # the state of the param splits over "data"
            assert _gathers_into(hlo, sharding.shard_shape(param.shape)), param.shape
    if mesh_name == "data8":  # replicated params and state: nothing to gather
        assert not _collective_results(replicated_hlo, "all-gather")
