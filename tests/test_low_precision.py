"""bfloat16 and float16 params that train like float32: ``kahan_summation`` and
``stochastic_rounding``.

* A least-squares problem near 1.0 with lr 1e-4: plain bfloat16 params never move; with either
  wrapper they make float32's progress (bfloat16 and float16).
* Kahan: ``optax.apply_updates`` gives the param nearest to the compensated sum exactly, and
  param + compensation keeps the sum of the updates.
* Stochastic rounding: each value goes to one of its two neighbours, unbiased on average;
  the same key gives the same run (jitted or not), another key another.
* Resuming from a host copy of the state (a checkpoint) is bit-identical to not stopping.
* Sharded params (Explicit and Auto meshes) give the unsharded run's params bit for bit, the
  shards round with different bits, and ``state_shardings`` places the compensation.
* Every alias and variant, ``MultiSteps``, ``apply_if_finite``, ``inject_hyperparams``,
  ``FlatParams`` and 8-bit moments work inside (or around) the wrappers; float32 leaves pass
  through untouched.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from variants import VARIANTS

import adam_jax

Wrapper = Callable[[optax.GradientTransformation], optax.GradientTransformation]
WRAPPERS: dict[str, Wrapper] = {
    "kahan": adam_jax.kahan_summation,
    "stochastic": lambda inner: adam_jax.stochastic_rounding(inner, key=0),
}


def _least_squares(seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``X w = y`` with the solution near 1.0, where a bfloat16 ulp is 2**-7."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    solution = 1.0 + 0.05 * rng.standard_normal(64).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(x @ solution), jnp.ones(64)


def _loss(w: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((x @ w.astype(jnp.float32) - y) ** 2)


def _train(tx: optax.GradientTransformation, dtype: Any, steps: int = 300) -> list[float]:
    """The losses of ``steps`` jitted Adam steps at lr 1e-4 from ``w = 1`` in ``dtype``."""
    x, y, w0 = _least_squares()
    w = w0.astype(dtype)
    state = tx.init(w)

    @jax.jit
    def step(w: jax.Array, state: Any) -> tuple[jax.Array, Any, jax.Array]:
        loss, grad = jax.value_and_grad(_loss)(w, x, y)
        updates, state = tx.update(grad.astype(w.dtype), state, w)
        return optax.apply_updates(w, updates), state, loss

    losses = []
    for _ in range(steps):
        w, state, loss = step(w, state)
        assert w.dtype == dtype
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_plain_low_precision_stalls_and_the_wrappers_make_float32_progress(dtype: Any) -> None:
    f32 = _train(adam_jax.adam(1e-4), jnp.float32)
    plain = _train(adam_jax.adam(1e-4), dtype)
    progress = f32[0] - f32[-1]
    assert progress > 0.1 * f32[0]
    if dtype == jnp.bfloat16:  # every update is below half an ulp: nothing moves
        assert plain[-1] == plain[0]
    assert plain[0] - plain[-1] < 0.5 * progress
    for name, wrap in WRAPPERS.items():
        losses = _train(wrap(adam_jax.adam(1e-4)), dtype)
        assert losses[0] - losses[-1] > 0.97 * progress, name


def test_kahan_update_lands_on_the_nearest_param_and_keeps_the_sum() -> None:
    """Each step: the new param is the bfloat16 nearest to ``p + (c + u)`` (float32, as
    specified), ``apply_updates`` gives it exactly, the compensation holds the rest; over the
    steps param + compensation keeps the sum of the updates (float64 bookkeeping)."""
    rng = np.random.default_rng(1)
    params = jnp.asarray(1 + rng.standard_normal(4096), jnp.bfloat16)
    tx = adam_jax.kahan_summation(optax.identity())
    state = tx.init(params)
    total = np.asarray(params, np.float64)
    bf16 = ml_dtypes.bfloat16
    for _ in range(20):
        update = (1e-4 * rng.standard_normal(4096)).astype(np.float32)
        p32 = np.asarray(params, np.float32)
        c32 = np.asarray(state.compensation, np.float32)
        target = p32 + (c32 + update)  # float32, the specified order
        updates, state = tx.update(jnp.asarray(update), state, params)
        params = optax.apply_updates(params, updates)
        assert params.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(params), target.astype(bf16))
        rest = (target - np.asarray(params, np.float32)).astype(bf16)
        np.testing.assert_array_equal(np.asarray(state.compensation), rest)
        total += update
    kept = np.asarray(params, np.float64) + np.asarray(state.compensation, np.float64)
    # Without the compensation the params would be off by up to half an ulp (2**-8 at 1-2).
    assert np.max(np.abs(kept - total)) < 2**-14
    assert np.max(np.abs(np.asarray(params, np.float64) - total)) > 2**-10


def test_kahan_with_updates_in_the_params_dtype_keeps_the_sum() -> None:
    """bfloat16 gradients give bfloat16 updates (as ``optax.apply_if_finite`` and
    ``MultiSteps`` need); params near zero, where steps change their sign and
    ``apply_updates`` rounds once more, are kept in the sum by the compensation."""
    rng = np.random.default_rng(5)
    params = jnp.asarray(1e-3 * rng.standard_normal(4096), jnp.bfloat16)
    tx = adam_jax.kahan_summation(optax.sgd(1.0))
    state = tx.init(params)
    total = np.asarray(params, np.float64)
    for _ in range(20):
        step = jnp.asarray(1e-3 * rng.standard_normal(4096), jnp.bfloat16)
        updates, state = tx.update(-step, state, params)  # sgd: -lr * grad = +step
        assert updates.dtype == jnp.bfloat16
        params = optax.apply_updates(params, updates)
        total += np.asarray(step, np.float64)
    kept = np.asarray(params, np.float64) + np.asarray(state.compensation, np.float64)
    assert np.max(np.abs(kept - total)) < 2**-7 * 1e-3 * 20  # compensation roundings only


def test_kahan_compensation_dtype() -> None:
    tx = adam_jax.kahan_summation(adam_jax.adam(1e-3), compensation_dtype=jnp.float32)
    state = tx.init({"w": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(2)})
    assert state.compensation["w"].dtype == jnp.float32
    assert state.compensation["b"] == optax.MaskedNode()  # float32 params: no buffer
    with pytest.raises(ValueError, match="compensation_dtype must be a floating-point dtype"):
        adam_jax.kahan_summation(adam_jax.adam(1e-3), compensation_dtype=jnp.int8)
    with pytest.raises(ValueError, match="kahan_summation needs params"):
        tx.update({"w": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(2)}, state)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_rounding_is_unbiased_between_the_two_neighbours(dtype: Any) -> None:
    low = np.float32(1.0)
    high = np.float32(jnp.nextafter(jnp.asarray(1.0, dtype), jnp.asarray(2.0, dtype)))
    fractions = np.arange(16, dtype=np.float32) / 16
    x = jnp.asarray(np.repeat(low + fractions * (high - low), 20_000))
    rounded = np.asarray(adam_jax.round_stochastically(x, dtype, jax.random.key(3)), np.float32)
    assert set(np.unique(rounded)) <= {low, high}
    up = (rounded.reshape(16, -1) == high).mean(axis=1)
    sigma = np.sqrt(fractions * (1 - fractions) / 20_000)
    assert np.all(np.abs(up - fractions) <= 4 * sigma + 1e-12)
    # Exact values, infinities and NaNs stay as they are.
    special = jnp.asarray([1.0, -2.5, np.inf, -np.inf, np.nan], jnp.float32)
    kept = adam_jax.round_stochastically(special, dtype, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(kept, np.float32), np.asarray(special))


def _problem(steps: int) -> tuple[dict[str, jax.Array], list[dict[str, jax.Array]]]:
    """A bfloat16 matrix and a float32 vector, and ``steps`` gradients in their dtypes."""
    rng = np.random.default_rng(2)
    params = {
        "w": jnp.asarray(rng.standard_normal((64, 16)), jnp.bfloat16),
        "b": jnp.asarray(rng.standard_normal(16), jnp.float32),
    }
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        for _ in range(steps)
    ]
    return params, grads


def _run(tx: optax.GradientTransformation, steps: int, jit: bool = True) -> tuple[Any, Any]:
    """``steps`` steps of ``tx`` on :func:`_problem`; the params and state."""
    params, grads = _problem(steps)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_stochastic_rounding_is_deterministic_per_key() -> None:
    """The same key, the same params (jitted, and eagerly: an eager run's float32 update can
    differ from the jitted one's in the last bit, which may flip a rounding, so the two modes
    are each compared with themselves); another key, other params."""
    tx = adam_jax.stochastic_rounding(adam_jax.adam(1e-3), key=jax.random.key(7))
    jitted, _ = _run(tx, 10)
    again, _ = _run(adam_jax.stochastic_rounding(adam_jax.adam(1e-3), key=7), 10)
    other, _ = _run(adam_jax.stochastic_rounding(adam_jax.adam(1e-3), key=8), 10)
    eager, _ = _run(tx, 3, jit=False)
    eager_again, _ = _run(tx, 3, jit=False)
    np.testing.assert_array_equal(np.asarray(jitted["w"]), np.asarray(again["w"]))
    np.testing.assert_array_equal(np.asarray(eager["w"]), np.asarray(eager_again["w"]))
    assert not np.array_equal(np.asarray(jitted["w"]), np.asarray(other["w"]))
    # float32 leaves are plain Adam.
    plain, _ = _run(adam_jax.adam(1e-3), 10)
    np.testing.assert_array_equal(np.asarray(jitted["b"]), np.asarray(plain["b"]))


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_resume_from_a_host_copy_is_bit_identical(name: str) -> None:
    tx = WRAPPERS[name](adam_jax.adamw(1e-3, weight_decay=0.1))
    straight, straight_state = _run(tx, 8)
    params, grads = _problem(8)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step, g in enumerate(grads):
        if step == 4:  # a checkpoint: everything to the host and back
            params, state = jax.tree.map(np.asarray, (params, state))
            params, state = jax.tree.map(jnp.asarray, (params, state))
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    for a, b in zip(
        jax.tree.leaves((straight, straight_state)), jax.tree.leaves((params, state)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_sharded_params_give_the_unsharded_run(name: str, axis_type: AxisType) -> None:
    """Params split over 8 devices: the params of the run on one device, and a state sharded
    like them. The sharded program's float32 update may differ from the unsharded one's in its
    last bit (other fusions), which can flip a bfloat16 rounding: so equal to within one
    bfloat16 ulp, and bit for bit in all but a few elements (each element draws its own random
    bits, whatever the sharding)."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
    tx = WRAPPERS[name](adam_jax.adam(1e-3))
    expected, _ = _run(tx, 4)
    params, grads = _problem(4)
    shardings = {"w": NamedSharding(mesh, P("x")), "b": NamedSharding(mesh, P())}
    params = jax.device_put(params, shardings)
    with jax.set_mesh(mesh):
        state = jax.jit(tx.init)(params)
        update = jax.jit(tx.update)
        for g in grads:
            updates, state = update(jax.device_put(g, shardings), state, params)
            params = optax.apply_updates(params, updates)
    assert params["w"].sharding.is_equivalent_to(shardings["w"], 2)
    if name == "kahan":
        assert state.compensation["w"].sharding.is_equivalent_to(shardings["w"], 2)
    np.testing.assert_allclose(np.asarray(params["b"]), np.asarray(expected["b"]), 2e-6)
    got, want = (np.asarray(x["w"], np.float32) for x in (params, expected))
    assert np.all(np.abs(got - want) <= 2**-7 * np.abs(want))
    assert np.mean(got == want) > 0.99


def test_stochastic_rounding_draws_different_bits_on_each_shard() -> None:
    """Equal values and equal updates everywhere: each shard of the result is rounded with its
    own bits, so the shards differ."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    sharding = NamedSharding(mesh, P("x"))
    params = jax.device_put(jnp.ones((8, 512), jnp.bfloat16), sharding)
    tx = adam_jax.stochastic_rounding(optax.sgd(1e-3), key=0)
    with jax.set_mesh(mesh):
        updates, _ = jax.jit(tx.update)(jnp.ones_like(params), tx.init(params), params)
        rounded = optax.apply_updates(params, updates)
    rows = {np.asarray(shard.data).tobytes() for shard in rounded.addressable_shards}
    assert len(rows) == 8


def test_zero1_state_shardings_place_the_compensation() -> None:
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    params = {"w": jnp.ones((64, 16), jnp.bfloat16), "b": jnp.ones(16, jnp.float32)}
    for name, wrap in WRAPPERS.items():
        tx = wrap(adam_jax.adamw(1e-3))
        shardings = adam_jax.sharding.state_shardings(tx, params, mesh, data_axis="data")
        with jax.set_mesh(mesh):
            state = jax.jit(tx.init, out_shardings=shardings)(params)
        inner_mu = state.inner_state[0].mu["w"]
        assert inner_mu.sharding.spec == P("data", None), name
        if name == "kahan":
            assert state.compensation["w"].sharding.spec == P("data", None)
            assert state.compensation["w"].addressable_shards[0].data.shape == (8, 16)


CORE_ALIASES = ("adam", "adamw", "nadam", "nadamw", "amsgrad", "adamax", "adam_l2")
OPTIMIZERS = {
    **{name: lambda name=name: getattr(adam_jax, name)(1e-3) for name in CORE_ALIASES},
    **{variant.name: variant.make for variant in VARIANTS},
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_alias_and_variant_trains_bfloat16_params(optimizer: str) -> None:
    for name, wrap in WRAPPERS.items():
        params, state = _run(wrap(OPTIMIZERS[optimizer]()), 3)
        assert params["w"].dtype == jnp.bfloat16, (optimizer, name)
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves((params, state)))


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_multi_steps_and_apply_if_finite_go_around_the_wrapper(name: str) -> None:
    params = {"w": jnp.ones(8, jnp.bfloat16)}
    grad = {"w": jnp.full(8, 0.5, jnp.bfloat16)}
    tx = optax.MultiSteps(WRAPPERS[name](optax.sgd(0.25)), every_k_schedule=2)
    state = tx.init(params)
    updates, state = tx.update(grad, state, params)
    assert np.array_equal(np.asarray(optax.apply_updates(params, updates)["w"]), np.ones(8))
    updates, state = tx.update(grad, state, params)
    np.testing.assert_array_equal(np.asarray(optax.apply_updates(params, updates)["w"]), 0.875)

    tx = optax.apply_if_finite(WRAPPERS[name](optax.sgd(0.25)), max_consecutive_errors=2)
    state = tx.init(params)
    before = state.inner_state
    updates, state = tx.update({"w": grad["w"].at[0].set(jnp.nan)}, state, params)
    np.testing.assert_array_equal(np.asarray(optax.apply_updates(params, updates)["w"]), 1.0)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.inner_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_inject_hyperparams_inside(name: str) -> None:
    tx = WRAPPERS[name](optax.inject_hyperparams(optax.sgd)(learning_rate=0.25))
    params = jnp.ones(4, jnp.bfloat16)
    state = tx.init(params)
    state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.5)
    updates, _ = tx.update(jnp.ones(4, jnp.bfloat16), state, params)
    np.testing.assert_array_equal(np.asarray(optax.apply_updates(params, updates)), 0.5)


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_flat_params_give_the_tree_run(name: str) -> None:
    rng = np.random.default_rng(4)
    tree = {
        "w": jnp.asarray(rng.standard_normal((32, 8)), jnp.bfloat16),
        "v": jnp.asarray(rng.standard_normal(40), jnp.bfloat16),
        "b": jnp.asarray(rng.standard_normal(8), jnp.float32),
    }
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), tree)
        for _ in range(3)
    ]
    tx = WRAPPERS[name](adam_jax.adam(1e-3))
    flat = adam_jax.flat.flatten(tree)
    state, flat_state = tx.init(tree), tx.init(flat)
    for g in grads:
        updates, state = tx.update(g, state, tree)
        tree = optax.apply_updates(tree, updates)
        flat_updates, flat_state = tx.update(adam_jax.flat.flatten(g), flat_state, flat)
        flat = optax.apply_updates(flat, flat_updates)
    if name == "kahan":  # elementwise: the same arithmetic on the packed buffers
        for key, value in flat.to_tree().items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(tree[key]))
    assert {leaf.dtype for leaf in jax.tree.leaves(flat)} == {
        jnp.dtype(jnp.bfloat16),
        jnp.dtype(jnp.float32),
    }


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_eight_bit_moments_inside(name: str) -> None:
    params = {"w": jnp.ones((64, 64), jnp.bfloat16)}
    tx = WRAPPERS[name](adam_jax.adamw_8bit(1e-3))
    state = tx.init(params)
    codes = [leaf for leaf in jax.tree.leaves(state.inner_state) if leaf.dtype == jnp.uint8]
    assert codes  # the moments are 8-bit
    for _ in range(3):
        updates, state = tx.update({"w": jnp.full((64, 64), 0.1, jnp.bfloat16)}, state, params)
        params = optax.apply_updates(params, updates)
    assert params["w"].dtype == jnp.bfloat16
    assert float(params["w"].astype(jnp.float32).mean()) < 1.0


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_sharded_train_step_exports_for_cuda_and_tpu(name: str) -> None:
    """Accelerator breaks caught on the CPU: the jitted step on bfloat16 params with a ZeRO-1
    state lowers for the cuda and tpu platforms."""
    if importlib.util.find_spec("flatbuffers") is None:
        pytest.skip("jax.export serialization needs flatbuffers")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    replicated = NamedSharding(mesh, P())
    params = {"w": jax.ShapeDtypeStruct((64, 128), jnp.bfloat16, sharding=replicated)}
    tx = WRAPPERS[name](adam_jax.adamw(1e-3, weight_decay=0.1))
    shardings = adam_jax.sharding.state_shardings(tx, params, mesh)
    state = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        jax.eval_shape(tx.init, params),
        shardings,
    )

    in_tree = jax.tree.structure((params, state))

    def flat_step(*leaves: jax.Array) -> list[jax.Array]:  # serializable: arrays in and out
        params, state = jax.tree.unflatten(in_tree, leaves)
        grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
        updates, state = tx.update(grads, state, params)
        return jax.tree.leaves((optax.apply_updates(params, updates), state))

    with jax.set_mesh(mesh):
        exported = jax.export.export(jax.jit(flat_step), platforms=("cuda", "tpu"))(
            *jax.tree.leaves((params, state))
        )
    assert exported.platforms == ("cuda", "tpu")
    assert exported.nr_devices == 8
    assert exported.out_avals[0].dtype == jnp.bfloat16  # the params stay bfloat16
    assert len(exported.serialize()) > 0
