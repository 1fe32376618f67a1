"""Moments not shaped like their param: block means (Adam-mini) and factored rows and columns
(Adafactor), kept by reducing storages that the core handles for every rule.

* Adam with block means or a factored second moment follows a float64 NumPy reference of the
  published rule (the step uses the reduced moment of this step: ``Leaf.settle``).
* The factored accumulators are Adafactor's: ``b2 R + (1 - b2) mean(g^2)`` over each axis.
* Every rule of the family runs with either storage; a rule that does not settle a reduced
  moment is refused by name.
* Sharded params and ZeRO-1 on 8 host devices, ``optax.tree_map_params``, complex params,
  checkpoints (a pytree round trip) and ``flax.nnx.Optimizer`` (which keeps a factored moment
  as an ``nnx.State`` of its fields) work; bad specs are refused with the leaf and the problem.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import adam_jax
from adam_jax import rules

B1, B2, EPS, LR = 0.9, 0.99, 1e-8, 1e-2
STEPS = 60


def _grads(shapes: dict[str, tuple[int, ...]], step: int, params: Any) -> dict[str, np.ndarray]:
    """Deterministic gradients that depend on the params (a quadratic) and on the step."""
    out = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        phase = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
        out[name] = np.asarray(params[name], np.float64) * (1 + 0.1 * i) + np.sin(
            0.7 * phase + 0.3 * step + i
        )
    return out


def _reference(
    shapes: dict[str, tuple[int, ...]], second_moment: Any, steps: int = STEPS
) -> dict[str, np.ndarray]:
    """Float64 Adam whose second moment is ``second_moment(name, v_state, g2)``: ``(new state,
    the second moment the step uses)``."""
    params = {n: np.linspace(-1, 1, int(np.prod(s))).reshape(s) for n, s in shapes.items()}
    m = {n: np.zeros(s) for n, s in shapes.items()}
    v: dict[str, Any] = {n: None for n in shapes}
    for t in range(1, steps + 1):
        g = _grads(shapes, t - 1, params)
        for n in shapes:
            m[n] = B1 * m[n] + (1 - B1) * g[n]
            v[n], v_used = second_moment(n, v[n], g[n] ** 2)
            u = (m[n] / (1 - B1**t)) / (np.sqrt(v_used / (1 - B2**t)) + EPS)
            params[n] = params[n] - LR * u
    return params


def _run(tx: optax.GradientTransformation, shapes: dict[str, tuple[int, ...]]) -> dict:
    params = {n: jnp.linspace(-1, 1, int(np.prod(s))).reshape(s) for n, s in shapes.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(STEPS):
        grads = jax.tree.map(jnp.asarray, _grads(shapes, step, params))
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _assert_close(ours: dict, expected: dict, rtol: float) -> None:
    for name in expected:
        np.testing.assert_allclose(np.asarray(ours[name]), expected[name], rtol=rtol, atol=1e-12)


SHAPES = {"w": (6, 4), "e": (5, 3), "s": (4,)}
BLOCKS = {"w": (6, 1), "e": (1, 3), "s": (4,)}


def _block_reference(blocks: dict[str, tuple[int, ...]]) -> Any:
    """Adam-mini's second moment with ``blocks``: the mean of g^2 over each block."""
    return lambda name, v, g2: _block_means(blocks[name], v, g2)


def _block_means(block: tuple[int, ...], v: Any, g2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = tuple(n // b for n, b in zip(g2.shape, block, strict=True))
    split = [x for pair in zip(counts, block, strict=True) for x in pair]
    means = g2.reshape(split).mean(axis=tuple(range(1, 2 * g2.ndim, 2)))
    v = (1 - B2) * means if v is None else B2 * v + (1 - B2) * means
    used = v
    for axis, (count, extent) in enumerate(zip(counts, block, strict=True)):
        used = np.repeat(used, extent, axis=axis) if count > 1 else used
    return v, np.broadcast_to(used, g2.shape)


def _block_storage(blocks: dict[str, tuple[int, ...]] = BLOCKS) -> Any:
    return adam_jax.per_leaf(lambda p: {n: adam_jax.block_means(b) for n, b in blocks.items()})


def test_block_means_follow_the_float64_reference(x64: None) -> None:
    tx = adam_jax.adam(LR, B1, B2, EPS, nu_dtype=_block_storage())
    _assert_close(_run(tx, SHAPES), _reference(SHAPES, _block_reference(BLOCKS)), rtol=1e-10)


def test_block_means_that_split_an_axis_repeat_their_mean(x64: None) -> None:
    blocks = {"w": (3, 2), "e": (5, 1), "s": (2,)}
    tx = adam_jax.adam(LR, B1, B2, EPS, nu_dtype=_block_storage(blocks))
    state = tx.init({n: jnp.zeros(s) for n, s in SHAPES.items()})
    assert {n: x.shape for n, x in state[0].nu.items()} == {"w": (2, 2), "e": (1, 3), "s": (2,)}
    _assert_close(_run(tx, SHAPES), _reference(SHAPES, _block_reference(blocks)), rtol=1e-10)


FACTORED = {"w": (8, 5), "t": (3, 6, 7), "b": (6,)}


def _factored_reference(name: str, v: Any, g2: np.ndarray) -> tuple[Any, np.ndarray]:
    if g2.ndim < 2 or sorted(g2.shape)[-2] < 5:
        v = (1 - B2) * g2 if v is None else B2 * v + (1 - B2) * g2
        return v, v
    order = np.argsort(g2.shape, kind="stable")
    d0, d1 = int(order[-1]), int(order[-2])
    row, col = g2.mean(axis=d1, keepdims=True), g2.mean(axis=d0, keepdims=True)
    if v is not None:  # Adafactor's accumulators
        row, col = B2 * v[0] + (1 - B2) * row, B2 * v[1] + (1 - B2) * col
    else:
        row, col = (1 - B2) * row, (1 - B2) * col
    return (row, col), row * col / row.mean(axis=d0, keepdims=True)


def test_factored_second_moment_follows_the_float64_reference(x64: None) -> None:
    tx = adam_jax.adam(LR, B1, B2, EPS, nu_dtype=adam_jax.factored_second_moment(5))
    _assert_close(_run(tx, FACTORED), _reference(FACTORED, _factored_reference), rtol=1e-10)


def test_factored_accumulators_are_adafactors(x64: None) -> None:
    tx = adam_jax.adam(LR, B1, B2, EPS, nu_dtype=adam_jax.factored_second_moment(5))
    params = {"w": jnp.zeros((8, 5))}
    state = tx.init(params)
    row = col = None
    for step in range(5):
        g = jnp.asarray(_grads({"w": (8, 5)}, step, params)["w"])
        _, state = tx.update({"w": g}, state, params)
        g2 = np.asarray(g) ** 2
        row = (1 - B2) * g2.mean(1, keepdims=True) + (0 if row is None else B2 * row)
        col = (1 - B2) * g2.mean(0, keepdims=True) + (0 if col is None else B2 * col)
    stored = state[0].nu["w"]
    np.testing.assert_allclose(stored.row, row, rtol=1e-12)
    np.testing.assert_allclose(stored.col, col, rtol=1e-12)


def test_factored_bytes_are_rows_plus_columns() -> None:
    params = {"w": jax.ShapeDtypeStruct((256, 128), jnp.float32)}
    plain = adam_jax.state_bytes(jax.eval_shape(adam_jax.adam(1e-3).init, params))
    factored = adam_jax.adam(1e-3, nu_dtype=adam_jax.factored_second_moment())
    reduced = adam_jax.state_bytes(jax.eval_shape(factored.init, params))
    assert plain - reduced == 4 * (256 * 128 - (256 + 128))


@pytest.mark.parametrize("storage", ["blocks", "factored"])
@pytest.mark.parametrize("name", adam_jax.registry.names())
def test_every_optimizer_keeps_a_reduced_second_moment(name: str, storage: str) -> None:
    info = adam_jax.registry.get(name)
    parameters = inspect.signature(info.alias).parameters
    if "nu_dtype" not in parameters:
        pytest.skip(f"{name} takes no nu_dtype")
    spec = _block_storage() if storage == "blocks" else adam_jax.factored_second_moment(4)
    tx = info.alias(1e-2, nu_dtype=spec)
    params = {n: jnp.linspace(-1, 1, int(np.prod(s))).reshape(s) for n, s in SHAPES.items()}
    state = tx.init(params)
    for step in range(3):
        grads = jax.tree.map(jnp.asarray, _grads(SHAPES, step, params))
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    assert jax.tree.map(jnp.shape, updates) == {n: s for n, s in SHAPES.items()}


def test_a_rule_that_does_not_settle_is_refused_by_name() -> None:
    @dataclasses.dataclass(frozen=True)
    class UnsettledRule(rules.AdamLikeRule):
        b1: float = 0.9
        b2: float = 0.999
        mu_dtype: Any = None
        nu_dtype: Any = None

        def update(self, g, moments, scalars, leaf):  # type: ignore[no-untyped-def]
            nu = rules.moving_average(moments["nu"], rules.abs_sq(g), scalars.w2)
            return g / (jnp.sqrt(nu) + 1e-8), {"mu": moments["mu"], "nu": nu}

    tx = rules.scale_by_rule(UnsettledRule(nu_dtype=adam_jax.factored_second_moment(2)))
    params = jnp.zeros((3, 2))
    with pytest.raises(ValueError, match="UnsettledRule does not settle moment 'nu'"):
        tx.update(jnp.ones((3, 2)), tx.init(params))
    plain = rules.scale_by_rule(UnsettledRule())  # a storage that keeps every element: fine
    plain.update(jnp.ones((3, 2)), plain.init(params))


def test_per_leaf_needs_the_params_structure() -> None:
    storage = adam_jax.per_leaf(lambda p: {"w": adam_jax.cast_storage()})
    with pytest.raises(ValueError, match="per_leaf: the storages must have the params"):
        adam_jax.adam(1e-3, nu_dtype=storage).init({"w": jnp.zeros(2), "b": jnp.zeros(2)})
    with pytest.raises(ValueError, match="per_leaf takes a function"):
        adam_jax.per_leaf({"w": adam_jax.cast_storage()})


def test_blocks_that_do_not_divide_are_refused() -> None:
    storage = adam_jax.per_leaf(lambda p: adam_jax.block_means((4, 1)))
    with pytest.raises(ValueError, match=r"blocks of shape \(4, 1\) do not divide .* \(6, 3\)"):
        adam_jax.adam(1e-3, nu_dtype=storage).init(jnp.zeros((6, 3)))
    with pytest.raises(ValueError, match="block extents must be >= 1"):
        adam_jax.block_means((0, 2))
    with pytest.raises(ValueError, match="min_dim_size_to_factor must be an integer >= 2"):
        adam_jax.factored_second_moment(1)


def test_complex_params_keep_a_real_reduced_moment() -> None:
    tx = adam_jax.adam(1e-2, nu_dtype=adam_jax.factored_second_moment(2))
    params = jnp.ones((4, 3), jnp.complex64)
    state = tx.init(params)
    updates, state = tx.update(jnp.full((4, 3), 1 + 2j, jnp.complex64), state)
    assert state[0].nu.row.dtype == jnp.float32 and updates.dtype == jnp.complex64
    np.testing.assert_allclose(updates, -1e-2 * (1 + 2j) / np.sqrt(5), rtol=1e-5)


def test_tree_map_params_and_a_checkpoint_round_trip() -> None:
    tx = adam_jax.adam(1e-2, nu_dtype=adam_jax.factored_second_moment(2))
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    mapped = optax.tree_map_params(tx, lambda p: p * 0, state)
    assert jax.tree.structure(mapped) == jax.tree.structure(state)
    leaves, treedef = jax.tree.flatten(state)
    restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
    a, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    b, _ = tx.update(jax.tree.map(jnp.ones_like, params), restored, params)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


def test_factored_moment_in_flax_nnx_optimizer() -> None:
    """nnx.Optimizer rebuilds the stored FactoredMoment as an nnx.State of its fields after a
    step; the storage reads it and writes back the same kind of container, and the steps match
    optax's on plain arrays."""
    from flax import nnx

    model = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
    tx = adam_jax.adam(1e-2, nu_dtype=adam_jax.factored_second_moment(4))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = tx.init(params)
    x = jnp.linspace(-1.0, 1.0, 32).reshape(4, 8)
    for _ in range(3):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        updates, state = tx.update(nnx.to_pure_dict(grads), state, params)
        params = optax.apply_updates(params, updates)
    nu = optimizer.opt_state[0].nu["kernel"].get_value()
    assert isinstance(nu, nnx.State) and nu.row.shape == (8, 1) and nu.col.shape == (1, 6)
    np.testing.assert_array_equal(nu.row, state[0].nu["kernel"].row)
    ours = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, ours, params)


@pytest.mark.parametrize("storage", ["blocks", "factored"])
def test_zero1_on_eight_devices_matches_one_device(storage: str) -> None:
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = (
        adam_jax.per_leaf(
            lambda p: {"w": adam_jax.block_means((16, 1)), "b": adam_jax.cast_storage()}
        )
        if storage == "blocks"
        else adam_jax.factored_second_moment(8)
    )
    tx = adam_jax.adamw(1e-2, nu_dtype=spec)
    params = {"w": jnp.linspace(-1, 1, 16 * 8).reshape(16, 8), "b": jnp.zeros(8)}
    grads = jax.tree.map(lambda p: jnp.cos(3 * p) + 0.1, params)
    shardings = adam_jax.sharding.state_shardings(tx, params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    placed = jax.device_put(params, replicated)
    state = jax.jit(tx.init, out_shardings=shardings)(placed)
    step = jax.jit(tx.update, out_shardings=(replicated, shardings))
    updates, state = step(jax.device_put(grads, replicated), state, placed)
    expected, _ = tx.update(grads, tx.init(params), params)
    for name in params:
        np.testing.assert_allclose(updates[name], expected[name], rtol=1e-6)
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
