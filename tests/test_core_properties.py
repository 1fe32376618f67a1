"""Hypothesis property tests of the Adam update (float64, small ``max_examples``).

* scale invariance: with eps = 0 (and eps_root = 0), scaling every gradient by ``c > 0``
  leaves the updates unchanged;
* sign symmetry: negated gradients give exactly negated updates;
* ``maximize=True`` equals minimising the negated gradients (weight decay unchanged);
* the update of plain Adam obeys the Cauchy-Schwarz bound
  ``|m_hat| / sqrt(v_hat) <= sqrt(sum_i w_i^2 / omega_i)`` where ``w_i``, ``omega_i`` are the
  (bias-corrected, summing to 1) EMA weights of the first and second moments; the first step
  from zero moments is exactly ``lr * sign(g)`` (eps = 0).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import adam_jax

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)

seeds = st.integers(0, 2**31 - 1)
b1s = st.sampled_from([0.0, 0.5, 0.9, 0.99])
b2s = st.sampled_from([0.9, 0.99, 0.999])
steps = st.integers(1, 6)


def _grad_sequence(seed: int, n_steps: int, scale: float = 1.0) -> list[dict]:
    """Gradients bounded away from zero (|g| in [0.1, 10]) with random signs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_steps):
        mag = 10.0 ** rng.uniform(-1, 1, (5,))
        sign = rng.choice([-1.0, 1.0], (5,))
        out.append({"w": jnp.asarray(scale * sign * mag, jnp.float64)})
    return out


def _run(opt, grads: list[dict], params: dict | None = None) -> list[dict]:
    params = params or {"w": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float64)}
    state = opt.init(params)
    out = []
    for g in grads:
        u, state = opt.update(g, state, params)
        out.append(u)
    return out


@SETTINGS
@given(seed=seeds, b1=b1s, b2=b2s, n=steps, log2_c=st.integers(-20, 20), nesterov=st.booleans())
def test_scale_invariance_power_of_two(seed, b1, b2, n, log2_c, nesterov) -> None:
    """eps = 0: gradients scaled by 2^k give the same updates (to float64 rounding)."""
    with jax.enable_x64(True):
        opt = adam_jax.adam(1e-3, b1=b1, b2=b2, eps=0.0, nesterov=nesterov)
        base = _run(opt, _grad_sequence(seed, n))
        scaled = _run(opt, _grad_sequence(seed, n, scale=2.0**log2_c))
        chex.assert_trees_all_close(base, scaled, rtol=1e-13, atol=0)


@SETTINGS
@given(seed=seeds, b1=b1s, b2=b2s, n=steps, c=st.floats(1e-3, 1e3), amsgrad=st.booleans())
def test_scale_invariance(seed, b1, b2, n, c, amsgrad) -> None:
    """eps = 0: gradients scaled by any c > 0 give the same updates (rtol 1e-12)."""
    with jax.enable_x64(True):
        make = adam_jax.amsgrad if amsgrad else adam_jax.adam
        opt = make(1e-3, b1=b1, b2=b2, eps=0.0)
        base = _run(opt, _grad_sequence(seed, n))
        scaled = _run(opt, _grad_sequence(seed, n, scale=c))
        chex.assert_trees_all_close(base, scaled, rtol=1e-12, atol=0)


@SETTINGS
@given(
    seed=seeds,
    b1=b1s,
    b2=b2s,
    n=steps,
    variant=st.sampled_from(["adam", "nadam", "amsgrad", "adamax", "keras"]),
)
def test_sign_symmetry(seed, b1, b2, n, variant) -> None:
    """Negated gradients give exactly negated updates (no weight decay)."""
    makers = {
        "adam": lambda: adam_jax.adam(1e-3, b1=b1, b2=b2),
        "nadam": lambda: adam_jax.nadam(1e-3, b1=b1, b2=b2),
        "amsgrad": lambda: adam_jax.amsgrad(1e-3, b1=b1, b2=b2),
        "adamax": lambda: adam_jax.adamax(1e-3, b1=b1, b2=b2),
        "keras": lambda: adam_jax.adam(1e-3, b1=b1, b2=b2, eps_placement="keras"),
    }
    with jax.enable_x64(True):
        opt = makers[variant]()
        grads = _grad_sequence(seed, n)
        base = _run(opt, grads)
        flipped = _run(opt, [jax.tree.map(jnp.negative, g) for g in grads])
        chex.assert_trees_all_equal(base, jax.tree.map(jnp.negative, flipped))


@SETTINGS
@given(
    seed=seeds,
    n=steps,
    wd=st.sampled_from([0.0, 1e-2, 0.5]),
    variant=st.sampled_from(["adamw", "adam_l2", "amsgrad", "adamaxw"]),
)
def test_maximize_equals_negated_gradients(seed, n, wd, variant) -> None:
    """maximize=True == minimising -g; weight decay keeps shrinking the params."""
    makers = {
        "adamw": lambda m: adam_jax.adamw(1e-2, weight_decay=wd, maximize=m),
        "adam_l2": lambda m: adam_jax.adam_l2(1e-2, weight_decay=wd, maximize=m),
        "amsgrad": lambda m: adam_jax.amsgrad(1e-2, maximize=m),
        "adamaxw": lambda m: adam_jax.adamaxw(1e-2, weight_decay=wd, maximize=m),
    }
    with jax.enable_x64(True):
        grads = _grad_sequence(seed, n)
        maximized = _run(makers[variant](True), grads)
        minimized = _run(makers[variant](False), [jax.tree.map(jnp.negative, g) for g in grads])
        chex.assert_trees_all_close(maximized, minimized, rtol=1e-14, atol=1e-17)


def _cauchy_schwarz_bound(b1: float, b2: float, t: int) -> float:
    k = np.arange(t)  # age of each gradient
    w = (1 - b1) * b1**k / (1 - b1**t)
    omega = (1 - b2) * b2**k / (1 - b2**t)
    return float(np.sqrt(np.sum(w**2 / omega)))


@SETTINGS
@given(seed=seeds, b1=b1s, b2=b2s, n=st.integers(1, 30))
def test_update_bound(seed, b1, b2, n) -> None:
    """|update_t| <= lr * sqrt(sum w_i^2 / omega_i) and the first step is lr * sign(g)."""
    with jax.enable_x64(True):
        lr = 1e-3
        updates = _run(adam_jax.adam(lr, b1=b1, b2=b2, eps=0.0), _grad_sequence(seed, n))
        for t, u in enumerate(updates, start=1):
            bound = lr * _cauchy_schwarz_bound(b1, b2, t)
            assert float(jnp.max(jnp.abs(u["w"]))) <= bound * (1 + 1e-12), (t, bound)
        first = _grad_sequence(seed, 1)[0]["w"]
        np.testing.assert_allclose(np.asarray(updates[0]["w"]), -lr * np.sign(first), rtol=1e-14)
