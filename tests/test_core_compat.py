"""adam_jax works wherever optax's Adam works.

jit (equal to eager up to rounding: XLA contracts multiply-adds when it compiles), vmap (over
learning rates and over b1), grad through the update (meta-gradients w.r.t. the learning rate
and the params, finite with ``eps_root > 0`` even at zero gradients),
``optax.inject_hyperparams`` (no recompilation when the learning rate changes),
``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.masked``, ``optax.multi_transform``,
``optax.tree_map_params``, ``flax.nnx.Optimizer``, ``jax.eval_shape`` of init, complex params,
``None`` leaves and sharded params (8 host CPU devices).
"""

from __future__ import annotations

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax


def _params() -> dict:
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal((3,)), jnp.float32),
    }


def _grads(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal((3,)), jnp.float32),
    }


ALIASES = {
    "adam": lambda lr: adam_jax.adam(lr),
    "adamw": lambda lr: adam_jax.adamw(lr, weight_decay=1e-2),
    "nadam": lambda lr: adam_jax.nadam(lr),
    "amsgrad": lambda lr: adam_jax.amsgrad(lr),
    "adam_l2": lambda lr: adam_jax.adam_l2(lr, weight_decay=1e-2),
    "adamax": lambda lr: adam_jax.adamax(lr),
    "adamaxw": lambda lr: adam_jax.adamaxw(lr),
    "keras": lambda lr: adam_jax.adam(lr, eps_placement="keras"),
}


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_jit_and_eager_agree_to_rounding(name: str) -> None:
    """Ten jitted updates equal ten eager updates to float32 rounding: a few ulps relative,
    or absolutely where a moment nearly cancels (mu, nu are O(1); updates O(lr))."""
    opt = ALIASES[name](1e-2)
    params = _params()
    s_eager = opt.init(params)
    s_jit = jax.jit(opt.init)(params)
    update = jax.jit(opt.update)
    for i in range(10):
        g = _grads(i)
        u_eager, s_eager = opt.update(g, s_eager, params)
        u_jit, s_jit = update(g, s_jit, params)
        chex.assert_trees_all_close(u_eager, u_jit, rtol=1e-6, atol=1e-8)
        chex.assert_trees_all_close(s_eager, s_jit, rtol=1e-6, atol=1e-6)


def test_vmap_over_learning_rates() -> None:
    """vmap over a batch of learning rates: updates scale exactly with the learning rate."""
    params, grads = _params(), _grads(1)
    lrs = jnp.asarray([1e-3, 2e-3, 4e-3, 1e-1])

    def one(lr):
        opt = adam_jax.adam(lr)
        state = opt.init(params)
        u, state = opt.update(grads, state, params)
        u, state = opt.update(_grads(2), state, params)
        return u

    batched = jax.vmap(one)(lrs)
    for i, lr in enumerate(np.asarray(lrs)):
        expected = one(float(lr))
        chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], batched), expected, rtol=1e-6)


def test_vmap_over_b1_matches_unbatched() -> None:
    """vmap over b1 (traced, so not validated) gives the per-value results."""
    params = _params()
    b1s = jnp.asarray([0.0, 0.5, 0.9, 0.99])

    def run(b1):
        opt = adam_jax.adamw(1e-2, b1=b1, weight_decay=1e-2)
        state = opt.init(params)
        p = params
        for i in range(4):
            u, state = opt.update(_grads(i), state, p)
            p = optax.apply_updates(p, u)
        return p

    batched = jax.jit(jax.vmap(run))(b1s)
    for i, b1 in enumerate(np.asarray(b1s)):
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], batched), run(float(b1)), rtol=1e-6, atol=1e-7
        )


def test_vmap_over_a_batch_of_models() -> None:
    """vmap of init and update over a leading batch axis of params and grads."""
    opt = adam_jax.adam(1e-2)
    params = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), _params())
    grads = jax.tree.map(lambda x: jnp.stack([x, -x]), _grads(0))
    state = jax.vmap(opt.init)(params)
    updates, _ = jax.vmap(opt.update)(grads, state, params)
    single, _ = opt.update(_grads(0), opt.init(_params()), _params())
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], updates), single, rtol=1e-6)
    chex.assert_trees_all_close(jax.tree.map(lambda x: -x[1], updates), single, rtol=1e-6)


def _loss(p: dict) -> jax.Array:
    return jnp.sum((p["w"] - 0.5) ** 2) + jnp.sum(jnp.sin(p["b"]))


def test_meta_gradient_wrt_learning_rate() -> None:
    """d/d lr of the loss after two steps is finite and matches a finite difference."""
    params = _params()

    def unrolled(lr):
        opt = adam_jax.adam(lr, eps_root=1e-8)
        state = opt.init(params)
        p = params
        for _ in range(2):
            u, state = opt.update(jax.grad(_loss)(p), state, p)
            p = optax.apply_updates(p, u)
        return _loss(p)

    lr = 1e-2
    g = jax.grad(unrolled)(lr)
    assert np.isfinite(float(g))
    h = 1e-3
    fd = (unrolled(lr + h) - unrolled(lr - h)) / (2 * h)
    np.testing.assert_allclose(float(g), float(fd), rtol=2e-2)


@pytest.mark.parametrize("name", ["adam", "adamw", "nadam", "amsgrad", "keras", "adam_l2"])
def test_grad_through_update_at_zero_gradient(name: str) -> None:
    """With eps_root > 0 the update is differentiable w.r.t. the gradients and params even
    where the gradient (and so the second moment) is exactly zero."""
    factories = {
        "adam": lambda: adam_jax.adam(1e-2, eps_root=1e-8),
        "adamw": lambda: adam_jax.adamw(1e-2, eps_root=1e-8),
        "nadam": lambda: adam_jax.nadam(1e-2, eps_root=1e-8),
        "amsgrad": lambda: adam_jax.amsgrad(1e-2, eps_root=1e-8),
        "keras": lambda: adam_jax.adam(1e-2, eps_root=1e-8, eps_placement="keras"),
        "adam_l2": lambda: adam_jax.adam_l2(1e-2, eps_root=1e-8, weight_decay=0.0),
    }
    opt = factories[name]()
    params = _params()
    zero = jax.tree.map(jnp.zeros_like, params)

    def after_step(p, g):
        u, _ = opt.update(g, opt.init(p), p)
        return jnp.sum(optax.apply_updates(p, u)["w"] ** 2) + jnp.sum(u["b"])

    dp, dg = jax.grad(after_step, argnums=(0, 1))(params, zero)
    chex.assert_tree_all_finite((dp, dg))
    # Meta-gradient through a step at params where the loss gradient vanishes.
    flat = {"w": jnp.full((4, 3), 0.5), "b": jnp.zeros((3,)) + jnp.pi / 2}
    meta = jax.grad(lambda p: after_step(p, jax.grad(_loss)(p)))(flat)
    chex.assert_tree_all_finite(meta)


def test_inject_hyperparams_changes_lr_without_recompiling() -> None:
    """The learning rate is changed at run time through the state: the jitted step is traced
    once, and the updates scale with the new value."""
    opt = optax.inject_hyperparams(adam_jax.adamw)(learning_rate=1e-2, weight_decay=1e-2)
    params = _params()
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        return opt.update(grads, state, params)

    state = opt.init(params)
    u1, _ = step(params, state, _grads(0))
    state2 = opt.init(params)
    # Same dtype and (strong) type as what inject_hyperparams stored: a new value, not a new
    # abstract signature.
    lr = state2.hyperparams["learning_rate"]
    state2.hyperparams["learning_rate"] = jnp.asarray(3e-2, lr.dtype)
    u3, _ = step(params, state2, _grads(0))
    assert len(traces) == 1
    chex.assert_trees_all_close(jax.tree.map(lambda x: 3 * x, u1), u3, rtol=1e-5)


def test_multi_steps_accumulates() -> None:
    """MultiSteps(adam, 3): the third mini-step applies adam to the mean of the 3 gradients."""
    params = _params()
    opt = optax.MultiSteps(adam_jax.adam(1e-2), every_k_schedule=3)
    state = opt.init(params)
    grads = [_grads(i) for i in range(3)]
    for g in grads[:2]:
        u, state = opt.update(g, state, params)
        chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
    u, state = opt.update(grads[2], state, params)
    mean = jax.tree.map(lambda *x: sum(x) / 3, *grads)
    inner = adam_jax.adam(1e-2)
    expected, _ = inner.update(mean, inner.init(params), params)
    chex.assert_trees_all_close(u, expected, rtol=1e-5, atol=1e-8)


def test_apply_if_finite_skips_nan_gradient() -> None:
    """A NaN gradient gives zero updates and leaves the Adam state untouched."""
    params = _params()
    opt = optax.apply_if_finite(adam_jax.adam(1e-2), max_consecutive_errors=3)
    state = opt.init(params)
    u, state = opt.update(_grads(0), state, params)
    before = state.inner_state
    bad = _grads(1)
    bad["w"] = bad["w"].at[0, 0].set(jnp.nan)
    u, state = opt.update(bad, state, params)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(state.inner_state, before)
    assert int(state.notfinite_count) == 1
    u, state = opt.update(_grads(2), state, params)
    chex.assert_tree_all_finite(u)
    ref = adam_jax.adam(1e-2)
    rs = ref.init(params)
    _, rs = ref.update(_grads(0), rs, params)
    expected, _ = ref.update(_grads(2), rs, params)
    # apply_if_finite evaluates the inner update inside lax.cond (compiled, so fused
    # differently from the eager reference): equal up to float32 rounding.
    chex.assert_trees_all_close(u, expected, rtol=1e-6, atol=0)


def test_optax_masked() -> None:
    """optax.masked(adam): masked-in leaves get Adam updates, others pass through."""
    params, grads = _params(), _grads(0)
    opt = optax.masked(adam_jax.adam(1e-2), {"w": True, "b": False})
    u, _ = opt.update(grads, opt.init(params), params)
    inner = adam_jax.adam(1e-2)
    expected, _ = inner.update({"w": grads["w"]}, inner.init({"w": params["w"]}), params)
    chex.assert_trees_all_close(u["w"], expected["w"], rtol=1e-6)
    chex.assert_trees_all_equal(u["b"], grads["b"])


def test_optax_multi_transform() -> None:
    """multi_transform routes leaves to adam_jax.adam and optax.sgd by label."""
    params, grads = _params(), _grads(0)
    opt = optax.multi_transform(
        {"adam": adam_jax.adamw(1e-2), "sgd": optax.sgd(0.1)}, {"w": "adam", "b": "sgd"}
    )
    state = opt.init(params)
    for _ in range(3):
        u, state = opt.update(grads, state, params)
    chex.assert_trees_all_close(u["b"], -0.1 * grads["b"], rtol=1e-6)
    assert bool(jnp.all(jnp.abs(u["w"]) > 0))


def test_optax_tree_map_params() -> None:
    """tree_map_params maps the param-shaped parts of the state (mu, nu) and nothing else."""
    params = _params()
    opt = adam_jax.adamw(1e-2, weight_decay=1e-2)
    state = opt.init(params)
    _, state = opt.update(_grads(0), state, params)
    mapped = optax.tree_map_params(opt, lambda v: v + 1.0, state)
    adam_state, mapped_adam = state[0], mapped[0]
    assert int(mapped_adam.count) == int(adam_state.count) == 1
    chex.assert_trees_all_close(mapped_adam.mu, jax.tree.map(lambda v: v + 1, adam_state.mu))
    chex.assert_trees_all_close(mapped_adam.nu, jax.tree.map(lambda v: v + 1, adam_state.nu))


def test_flax_nnx_optimizer_trains() -> None:
    """flax.nnx.Optimizer with adam_jax.adamw trains a small nnx.Linear: the loss decreases."""
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, adam_jax.adamw(5e-2, weight_decay=1e-4), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 3)), jnp.float32)
    y = x @ jnp.asarray([[1.0], [-2.0], [0.5]]) + 0.3

    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def train_step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    first = float(train_step(model, optimizer))
    for _ in range(150):
        last = float(train_step(model, optimizer))
    assert last < 0.05 * first, (first, last)


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_eval_shape_init(name: str) -> None:
    """jax.eval_shape(init) on ShapeDtypeStructs gives the shapes/dtypes of the real init."""
    opt = ALIASES[name](1e-2)
    params = _params()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shapes = jax.eval_shape(opt.init, abstract)
    real = opt.init(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, real)


@pytest.mark.parametrize("name", ["adam", "adamw", "amsgrad", "adamax"])
def test_init_directly_from_shape_dtype_structs(name: str) -> None:
    """init accepts ShapeDtypeStruct leaves (mixed real / complex / low precision) and gives
    the same state as init on real arrays."""
    params = {
        "w": jnp.ones((3, 2), jnp.bfloat16),
        "c": jnp.ones((2,), jnp.complex64),
        "f": jnp.ones((4,), jnp.float32),
    }
    opt = ALIASES[name](1e-2)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    chex.assert_trees_all_equal(opt.init(abstract), opt.init(params))


def test_complex_params_converge() -> None:
    """Complex params: Adam on |z - c|^2 (gradient z - c) converges; nu stays real."""
    c = jnp.asarray([1 + 2j, -0.5 + 0.1j, 3j], jnp.complex64)
    z = {"z": jnp.zeros((3,), jnp.complex64)}
    opt = adam_jax.adam(5e-2)
    state = opt.init(z)
    update = jax.jit(opt.update)
    for _ in range(400):
        u, state = update({"z": z["z"] - c}, state, z)
        z = optax.apply_updates(z, u)
    assert z["z"].dtype == jnp.complex64
    assert state[0].nu["z"].dtype == jnp.float32
    assert float(jnp.max(jnp.abs(z["z"] - c))) < 5e-2


def test_none_leaves_in_params() -> None:
    """None leaves in params (and grads) stay None; the other leaves are updated normally."""
    params = {"a": jnp.ones((3,)), "frozen": None, "nested": {"b": jnp.ones(()), "c": None}}
    grads = {
        "a": jnp.full((3,), 0.5),
        "frozen": None,
        "nested": {"b": jnp.asarray(-1.0), "c": None},
    }
    cases = [
        (adam_jax.adamw(1e-2, weight_decay=0.1), 1e-2 * (1 - 0.1)),
        (adam_jax.amsgrad(1e-2), 1e-2),
    ]
    for opt, expected_b in cases:
        state = opt.init(params)
        u, state = jax.jit(opt.update)(grads, state, params)
        assert u["frozen"] is None and u["nested"]["c"] is None
        # First step: the Adam direction is sign(g) (up to eps), plus wd * p for adamw.
        np.testing.assert_allclose(np.asarray(u["nested"]["b"]), expected_b, rtol=1e-5)
        new = optax.apply_updates(params, u)
        assert new["frozen"] is None


def _mesh(explicit: bool) -> Mesh:
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 host devices (XLA_FLAGS set in conftest before jax import)")
    if explicit:
        types = (jax.sharding.AxisType.Explicit,) * 2
        return jax.make_mesh((4, 2), ("data", "model"), axis_types=types)
    return Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


@pytest.mark.parametrize("name", ["adam", "adamw", "amsgrad", "adamax"])
@pytest.mark.parametrize("explicit", [False, True], ids=["auto_mesh", "explicit_mesh"])
def test_state_keeps_param_sharding(name: str, explicit: bool) -> None:
    """After jitted init/update, mu/nu (and updates) carry the params' NamedSharding (an Auto
    mesh, where a plain zeros_like under jit loses it, and an Explicit mesh via set_mesh)."""
    mesh = _mesh(explicit)
    with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
        _check_sharding(name, mesh)


def _check_sharding(name: str, mesh: Mesh) -> None:
    specs = {"w": P("data", "model"), "b": P("model"), "r": P()}
    params = {
        "w": jnp.arange(32.0).reshape(8, 4) / 32,
        "b": jnp.ones((4,)),
        "r": jnp.ones((3,)),
    }
    params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    grads = jax.tree.map(lambda p: p * 0.5 - 0.1, params)
    opt = ALIASES[name](1e-2)
    state = jax.jit(opt.init)(params)
    updates, state = jax.jit(opt.update)(grads, state, params)
    moments = state[0]
    for field in ("mu", "nu", "nu_max"):
        tree = getattr(moments, field, None)
        if tree is None:
            continue
        for k, leaf in tree.items():
            assert leaf.sharding.is_equivalent_to(params[k].sharding, leaf.ndim), (
                field,
                k,
                leaf.sharding,
            )
    for k, leaf in updates.items():
        assert leaf.sharding.is_equivalent_to(params[k].sharding, leaf.ndim), (k, leaf.sharding)
    chex.assert_tree_all_finite(updates)
