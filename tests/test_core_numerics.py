"""Numerical behaviour: float32 accuracy, low-precision dtypes, overflow of the step count.

* The float32 trajectory of ``adam_jax.adam`` / ``amsgrad`` is at least as close to the
  float64 truth as PyTorch's float32 formula and as optax's float32 implementation.
* float16 params with a zero gradient give a finite (zero) update; bfloat16 params under
  ``optax.inject_hyperparams`` give finite updates (optax 0.2.8 gives NaN in both cases, which
  is asserted as a documented contrast, guarded on the optax version).
* The dtype matrix: params in float16 / bfloat16 / float32 / float64 / complex64 / complex128
  with ``mu_dtype`` / ``nu_dtype`` combinations: updates in the params' dtype, state in the
  requested dtypes, finite values.
* The step count saturates at int32 max instead of wrapping.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references.adam import RefAdam, pytorch_adam_float32

import adam_jax

OPTAX_VERSION = tuple(int(x) for x in optax.__version__.split(".")[:3] if x.isdigit())
OPTAX_HAS_LOW_PRECISION_NANS = OPTAX_VERSION <= (0, 2, 8)

# ------------------------------------------------------------------------------------------
# float32 accuracy against float64 truth
# ------------------------------------------------------------------------------------------

PRECISION_STEPS = 400
PRECISION_LR = 1e-3


def _gradient_sequence(seed: int = 0, n: int = 512, steps: int = PRECISION_STEPS) -> np.ndarray:
    """A fixed float32 gradient sequence (drift + noise over 5 orders of magnitude)."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-3, 2, n)
    drift = rng.standard_normal(n)
    noise = rng.standard_normal((steps, n))
    return (scale * (0.3 * drift + noise)).astype(np.float32)


def _jax_trajectory(opt: optax.GradientTransformation, p0: np.ndarray, grads: np.ndarray):
    """Trajectory of ``opt`` fed the open-loop gradient sequence ``grads`` (params dtype)."""

    def step(carry, g):
        p, s = carry
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), p

    @jax.jit
    def run(p, gs):
        _, traj = jax.lax.scan(step, (p, opt.init(p)), gs)
        return traj

    return np.asarray(run(jnp.asarray(p0), jnp.asarray(grads)))


def _float64_trajectory(ref: RefAdam, p0: np.ndarray, grads: np.ndarray) -> np.ndarray:
    p = p0.astype(np.float64)
    ref.init([p])
    out = []
    for g in grads.astype(np.float64):
        p = p + ref.update([g], [p])[0]
        out.append(p)
    return np.stack(out)


def _max_rel_error(traj: np.ndarray, truth: np.ndarray) -> float:
    """max over steps of ||p32 - p64||_inf / ||p64||_inf (relative error of the trajectory)."""
    err = np.abs(traj.astype(np.float64) - truth).max(axis=1)
    return float((err / np.abs(truth).max(axis=1)).max())


def _torch_trajectory(p0: np.ndarray, grads: np.ndarray, amsgrad: bool) -> np.ndarray | None:
    try:
        import torch
    except ImportError:
        return None
    p = torch.tensor(p0, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([p], lr=PRECISION_LR, amsgrad=amsgrad, foreach=False)
    out = []
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
        out.append(p.detach().numpy().copy())
    return np.stack(out)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_float32_at_least_as_accurate_as_pytorch_and_optax(amsgrad: bool) -> None:
    """adam_jax float32 error <= PyTorch-formula float32 error and <= optax float32 error."""
    grads = _gradient_sequence()
    p0 = np.random.default_rng(1).standard_normal(grads.shape[1]).astype(np.float32)
    truth = _float64_trajectory(RefAdam(PRECISION_LR, amsgrad=amsgrad), p0, grads)
    if amsgrad:
        ours = _jax_trajectory(adam_jax.amsgrad(PRECISION_LR), p0, grads)
        theirs = _jax_trajectory(optax.amsgrad(PRECISION_LR), p0, grads)
    else:
        ours = _jax_trajectory(adam_jax.adam(PRECISION_LR), p0, grads)
        theirs = _jax_trajectory(optax.adam(PRECISION_LR), p0, grads)
    assert ours.dtype == np.float32
    grads_iter = iter(grads)
    pytorch_formula = pytorch_adam_float32(
        p0, lambda p, k: next(grads_iter), PRECISION_STEPS, lr=PRECISION_LR, amsgrad=amsgrad
    )[1:]
    err_ours = _max_rel_error(ours, truth)
    err_pytorch_formula = _max_rel_error(pytorch_formula, truth)
    errors = {"adam_jax": err_ours, "pytorch_formula_numpy": err_pytorch_formula}
    torch_traj = _torch_trajectory(p0, grads, amsgrad)
    if torch_traj is not None:
        errors["torch"] = _max_rel_error(torch_traj, truth)
    if not amsgrad:  # optax.amsgrad implements a different algorithm (max of corrected nu)
        errors["optax"] = _max_rel_error(theirs, truth)
    assert err_ours < 1e-5, errors
    for name, err in errors.items():
        assert err_ours <= err, (name, errors)


def test_float32_updates_close_to_float64_updates() -> None:
    """Open-loop float32 updates are within a few ulps of the float64 formula."""
    grads = _gradient_sequence(seed=2, n=64, steps=300)
    p0 = np.ones(64, np.float32)
    opt = adam_jax.adam(PRECISION_LR)
    update = jax.jit(opt.update)
    state = opt.init(jnp.asarray(p0))
    ref = RefAdam(PRECISION_LR)
    ref.init([p0])
    worst = 0.0
    for g in grads:
        u, state = update(jnp.asarray(g), state, jnp.asarray(p0))
        expected = ref.update([g.astype(np.float64)], [p0.astype(np.float64)])[0]
        worst = max(worst, float(np.max(np.abs(np.asarray(u, np.float64) - expected))))
    # |update| <= lr * (1 - b1) / sqrt(1 - b2) ~ 3.2 lr; allow 16 float32 ulps of that scale.
    assert worst <= 16 * np.finfo(np.float32).eps * 3.2 * PRECISION_LR, worst


# ------------------------------------------------------------------------------------------
# Low precision
# ------------------------------------------------------------------------------------------


def test_float16_zero_gradient_is_finite() -> None:
    """float16 params, zero gradient: the update is finite and zero (eps = 1e-8 underflows in
    float16, so computing in float16 gives 0 / 0 = NaN, which optax 0.2.8 does)."""
    params = {"w": jnp.ones((4,), jnp.float16)}
    grads = {"w": jnp.zeros((4,), jnp.float16)}
    opt = adam_jax.adam(1e-3)
    updates, state = opt.update(grads, opt.init(params), params)
    assert updates["w"].dtype == jnp.float16
    chex.assert_tree_all_finite(updates)
    chex.assert_trees_all_equal(updates, {"w": jnp.zeros((4,), jnp.float16)})
    chex.assert_tree_all_finite(state)
    optax_opt = optax.adam(1e-3)
    optax_updates, _ = optax_opt.update(grads, optax_opt.init(params), params)
    if OPTAX_HAS_LOW_PRECISION_NANS:
        assert bool(jnp.all(jnp.isnan(optax_updates["w"]))), "documented optax contrast changed"


def test_bfloat16_inject_hyperparams_is_finite() -> None:
    """bfloat16 params under inject_hyperparams(adam)(learning_rate=1e-3): b2 = 0.999 rounds to
    1 in bfloat16; adam_jax still gives finite updates (optax 0.2.8: NaN at step 1)."""
    params = {"w": jnp.linspace(-1, 1, 8, dtype=jnp.bfloat16)}
    grads = {"w": jnp.linspace(-0.5, 0.3, 8, dtype=jnp.bfloat16)}
    opt = optax.inject_hyperparams(adam_jax.adam)(learning_rate=1e-3)
    state = opt.init(params)
    for _ in range(3):
        updates, state = opt.update(grads, state, params)
        assert updates["w"].dtype == jnp.bfloat16
        chex.assert_tree_all_finite(updates)
        params = optax.apply_updates(params, updates)
    assert bool(jnp.any(updates["w"] != 0))
    optax_opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    optax_updates, _ = optax_opt.update(grads, optax_opt.init(params), params)
    if OPTAX_HAS_LOW_PRECISION_NANS:
        assert bool(jnp.all(jnp.isnan(optax_updates["w"]))), "documented optax contrast changed"


def test_bfloat16_params_float32_nu() -> None:
    """bfloat16 params with nu_dtype=float32: nu stored in float32, mu in bfloat16, updates in
    bfloat16 and close to the float32 computation."""
    rng = np.random.default_rng(0)
    p32 = rng.standard_normal((16,)).astype(np.float32)
    params = {"w": jnp.asarray(p32, jnp.bfloat16)}
    opt = adam_jax.adam(1e-2, nu_dtype=jnp.float32)
    state = opt.init(params)
    assert state[0].nu["w"].dtype == jnp.float32
    assert state[0].mu["w"].dtype == jnp.bfloat16
    ref = RefAdam(1e-2)
    ref.init([p32])
    for _ in range(20):
        g = rng.standard_normal((16,)).astype(np.float32) * 1e-3
        g_bf16 = jnp.asarray(g, jnp.bfloat16)
        updates, state = opt.update({"w": g_bf16}, state, params)
        expected = ref.update([np.asarray(g_bf16, np.float64)], [p32])[0]
        assert updates["w"].dtype == jnp.bfloat16
        chex.assert_tree_all_finite(updates)
        # bfloat16 has 8 bits of mantissa and mu is rounded to it every step: 5% of the
        # update, or 1% of the learning rate where mu nearly cancels.
        np.testing.assert_allclose(
            np.asarray(updates["w"], np.float64), expected, rtol=0.05, atol=1e-4
        )
    assert state[0].nu["w"].dtype == jnp.float32


# ------------------------------------------------------------------------------------------
# The dtype matrix
# ------------------------------------------------------------------------------------------

REAL = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}
MOMENT = {"default": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _check_dtypes(params_dtype, mu_dtype, nu_dtype) -> None:
    real_dtype = jnp.finfo(params_dtype).dtype
    rng = np.random.default_rng(0)
    shape = (3, 2)

    def draw():
        x = rng.standard_normal(shape)
        if jnp.issubdtype(params_dtype, jnp.complexfloating):
            x = x + 1j * rng.standard_normal(shape)
        return jnp.asarray(x, params_dtype)

    params = {"a": draw(), "b": {"c": draw()}}
    for opt in (
        adam_jax.adam(1e-3, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        adam_jax.amsgrad(1e-3, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        adam_jax.adamw(1e-3, mu_dtype=mu_dtype, nu_dtype=nu_dtype, nesterov=True),
    ):
        state = jax.jit(opt.init)(params)
        update = jax.jit(opt.update)
        for _ in range(3):
            grads = {"a": draw(), "b": {"c": draw()}}
            updates, state = update(grads, state, params)
            params = optax.apply_updates(params, updates)
        moments = state[0]
        for leaf in jax.tree.leaves(updates):
            assert leaf.dtype == params_dtype
        for leaf in jax.tree.leaves(params):
            assert leaf.dtype == params_dtype
        for leaf in jax.tree.leaves(moments.mu):
            assert leaf.dtype == (mu_dtype or params_dtype), leaf.dtype
        nus = [moments.nu] + ([moments.nu_max] if hasattr(moments, "nu_max") else [])
        for leaf in jax.tree.leaves(nus):
            assert leaf.dtype == (nu_dtype or real_dtype), leaf.dtype
            assert not jnp.issubdtype(leaf.dtype, jnp.complexfloating)
        assert moments.count.dtype == jnp.int32
        chex.assert_tree_all_finite((updates, state, params))


@pytest.mark.parametrize("params_name", sorted(REAL))
@pytest.mark.parametrize("mu_name", sorted(MOMENT))
@pytest.mark.parametrize("nu_name", ["default", "float32"])
def test_dtype_matrix(params_name: str, mu_name: str, nu_name: str) -> None:
    """Updates in the params' dtype, mu/nu in the requested dtypes, finite values."""
    _check_dtypes(REAL[params_name], MOMENT[mu_name], MOMENT[nu_name])


@pytest.mark.parametrize("mu_name", ["default", "float32"])
def test_dtype_matrix_float64(mu_name: str, x64: None) -> None:
    """float64 params (float32 / default moments)."""
    _check_dtypes(jnp.float64, MOMENT[mu_name], MOMENT[mu_name])


@pytest.mark.parametrize("params_name", ["complex64", "complex128"])
def test_dtype_matrix_complex(params_name: str, x64: None) -> None:
    """Complex params: mu complex, nu real (the real part's dtype), updates complex."""
    _check_dtypes(jnp.dtype(params_name), None, None)


def test_moment_storage_cast_storage_instance() -> None:
    """mu_dtype / nu_dtype accept an ``adam_jax.cast_storage`` instance like a dtype."""
    params = {"w": jnp.ones((4,), jnp.float32)}
    opt = adam_jax.adam(
        1e-3,
        mu_dtype=adam_jax.cast_storage(jnp.bfloat16),
        nu_dtype=adam_jax.cast_storage(jnp.float32),
    )
    state = opt.init(params)
    assert state[0].mu["w"].dtype == jnp.bfloat16
    assert state[0].nu["w"].dtype == jnp.float32
    updates, state = opt.update({"w": jnp.full((4,), 0.5)}, state, params)
    assert updates["w"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(updates["w"]), -1e-3, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Step count saturation
# ------------------------------------------------------------------------------------------

INT32_MAX = int(np.iinfo(np.int32).max)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: adam_jax.adam(1e-3),
        lambda: adam_jax.adamw(optax.constant_schedule(1e-3), weight_decay=1e-2),
        lambda: adam_jax.amsgrad(1e-3),
        lambda: adam_jax.adamax(1e-3),
        lambda: adam_jax.adam(1e-3, eps_placement="keras"),
    ],
    ids=["adam", "adamw_schedule", "amsgrad", "adamax", "keras"],
)
def test_count_saturates_at_int32_max(factory) -> None:
    """Starting at count = int32 max - 2, five updates leave every count at int32 max (no
    wrap-around to negative counts) and the updates stay finite and equal to a late-step
    update (bias corrections ~1)."""
    opt = factory()
    params = {"w": jnp.linspace(-1.0, 1.0, 6)}
    grads = {"w": jnp.linspace(0.5, -0.25, 6)}
    state = opt.init(params)
    state = optax.tree.set(state, count=jnp.asarray(INT32_MAX - 2, jnp.int32))
    update = jax.jit(opt.update)
    for _ in range(5):
        updates, state = update(grads, state, params)
        chex.assert_tree_all_finite(updates)
    counts = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
        if "count" in jax.tree_util.keystr(path)
    ]
    assert counts, "no count in the state"
    for c in counts:
        assert c.dtype == jnp.int32
        assert int(c) == INT32_MAX


# ------------------------------------------------------------------------------------------
# The MomentStorage protocol with a pytree-valued stored form
# ------------------------------------------------------------------------------------------


class _Scaled(NamedTuple):
    value: jax.Array  # moment * scale, float32
    scale: jax.Array  # scalar


class _ScaledStorage(adam_jax.MomentStorage):
    """Stores a moment as (moment * 2, 2): a pytree-valued stored form; exact round trip."""

    def init(self, param):
        return _Scaled(jnp.zeros(param.shape, jnp.float32), jnp.asarray(2.0, jnp.float32))

    def load(self, stored):
        return stored.value / stored.scale

    def store(self, value, stored):
        return _Scaled((value * stored.scale).astype(jnp.float32), stored.scale)


def test_custom_moment_storage_pytree() -> None:
    """A MomentStorage whose stored leaf is a NamedTuple: state holds the stored form, updates
    equal plain float32 Adam's, and init / update work under jit and eval_shape."""
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones((3,))}
    storage = _ScaledStorage()
    ours = adam_jax.adam(1e-2, mu_dtype=storage, nu_dtype=storage)
    plain = adam_jax.adam(1e-2)
    s1, s2 = jax.jit(ours.init)(params), plain.init(params)
    assert isinstance(s1[0].mu["w"], _Scaled) and isinstance(s1[0].nu["b"], _Scaled)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(ours.init, abstract), s1)
    update = jax.jit(ours.update)
    rng = np.random.default_rng(0)
    for _ in range(20):
        g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
        u1, s1 = update(g, s1, params)
        u2, s2 = plain.update(g, s2, params)
        chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-9)
    chex.assert_trees_all_close(
        jax.tree.map(lambda s: s.value / 2, s1[0].mu, is_leaf=lambda x: isinstance(x, _Scaled)),
        s2[0].mu,
        rtol=1e-6,
        atol=1e-6,  # mu is O(1); jitted vs eager float32 rounding where it nearly cancels
    )
