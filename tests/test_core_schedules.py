"""Learning-rate schedules.

``warmup_stable_decay_schedule``, ``inverse_sqrt_schedule`` and ``linear_warmup`` against
float64 values computed by hand from their definitions (``tests/references/schedules.py``) at
the boundary steps; every optax schedule works as a learning rate; the first update uses the
schedule's value at step 0.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references import schedules

import adam_jax


def _check(schedule, expected_fn, steps: list[int], rtol: float = 1e-6) -> None:
    for t in steps:
        got = float(schedule(t))
        want = expected_fn(t)
        assert math.isclose(got, want, rel_tol=rtol, abs_tol=1e-12), (t, got, want)
        got_jit = float(jax.jit(schedule)(jnp.asarray(t, jnp.int32)))
        assert math.isclose(got_jit, want, rel_tol=rtol, abs_tol=1e-12), (t, got_jit, want)


@pytest.mark.parametrize("decay_type", ["linear", "cosine", "sqrt"])
def test_warmup_stable_decay(decay_type: str) -> None:
    """Warmup 10, stable 20, decay 30 from peak 1e-2 to 1e-4 (init 1e-3)."""
    kwargs = dict(
        peak_value=1e-2,
        warmup_steps=10,
        stable_steps=20,
        decay_steps=30,
        init_value=1e-3,
        end_value=1e-4,
        decay_type=decay_type,
    )
    schedule = adam_jax.warmup_stable_decay_schedule(**kwargs)
    steps = [0, 1, 5, 9, 10, 11, 29, 30, 31, 37, 45, 59, 60, 61, 100, 10_000]
    _check(schedule, lambda t: schedules.warmup_stable_decay(t, **kwargs), steps)


def test_warmup_stable_decay_hand_values() -> None:
    """A few values written out by hand (linear decay, init 0, end 0)."""
    schedule = adam_jax.warmup_stable_decay_schedule(1.0, 4, 2, 4)
    expected = {0: 0.0, 1: 0.25, 2: 0.5, 4: 1.0, 5: 1.0, 6: 1.0, 7: 0.75, 8: 0.5, 10: 0.0, 11: 0.0}
    _check(schedule, expected.__getitem__, list(expected))


def test_warmup_stable_decay_sqrt_hand_values() -> None:
    """sqrt decay: peak - (peak - end) * sqrt(frac)."""
    schedule = adam_jax.warmup_stable_decay_schedule(
        2.0, 0, 0, 16, end_value=1.0, decay_type="sqrt"
    )
    expected = {0: 2.0, 1: 1.75, 4: 1.5, 9: 1.25, 16: 1.0, 20: 1.0}
    _check(schedule, expected.__getitem__, list(expected))


def test_inverse_sqrt() -> None:
    """Linear warmup over 100 steps from 1e-4 to 1e-2, then peak * sqrt(100 / t)."""
    kwargs = dict(peak_value=1e-2, warmup_steps=100, init_value=1e-4)
    schedule = adam_jax.inverse_sqrt_schedule(**kwargs)
    steps = [0, 1, 50, 99, 100, 101, 400, 2500, 1_000_000]
    _check(schedule, lambda t: schedules.inverse_sqrt(t, **kwargs), steps)
    assert math.isclose(float(schedule(400)), 5e-3, rel_tol=1e-6)
    assert math.isclose(float(schedule(10_000)), 1e-3, rel_tol=1e-6)


def test_linear_warmup_wraps_a_schedule() -> None:
    """linear_warmup(cosine, 10): init -> schedule(0) over 10 steps, then schedule(t - 10)."""
    inner = optax.cosine_decay_schedule(init_value=1e-2, decay_steps=50, alpha=0.1)
    schedule = adam_jax.linear_warmup(inner, warmup_steps=10, init_value=1e-4)

    def inner_np(t: int) -> float:
        frac = min(t, 50) / 50
        return 1e-2 * ((1 - 0.1) * 0.5 * (1 + math.cos(math.pi * frac)) + 0.1)

    steps = [0, 1, 5, 9, 10, 11, 35, 60, 61, 200]
    _check(schedule, lambda t: schedules.linear_warmup(t, inner_np, 10, 1e-4), steps)
    assert math.isclose(float(schedule(10)), 1e-2, rel_tol=1e-6)


OPTAX_SCHEDULES = {
    "constant": lambda: optax.constant_schedule(3e-3),
    "linear": lambda: optax.linear_schedule(1e-2, 1e-3, 20),
    "cosine_decay": lambda: optax.cosine_decay_schedule(1e-2, 20),
    "warmup_cosine_decay": lambda: optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 20),
    "exponential_decay": lambda: optax.exponential_decay(1e-2, 3, 0.5, staircase=True),
    "piecewise_constant": lambda: optax.piecewise_constant_schedule(1e-2, {5: 0.5, 10: 0.1}),
    "polynomial": lambda: optax.polynomial_schedule(1e-2, 1e-4, 2, 15),
    "join": lambda: optax.join_schedules(
        [optax.constant_schedule(1e-3), optax.linear_schedule(1e-2, 0.0, 10)], [4]
    ),
    "wsd": lambda: adam_jax.warmup_stable_decay_schedule(1e-2, 3, 5, 10, decay_type="cosine"),
    "inverse_sqrt": lambda: adam_jax.inverse_sqrt_schedule(1e-2, 4),
}


@pytest.mark.parametrize("name", sorted(OPTAX_SCHEDULES))
def test_schedule_as_learning_rate(name: str) -> None:
    """Step k (0-based) of adam(schedule) equals schedule(k) * the direction of adam(1.0)."""
    schedule = OPTAX_SCHEDULES[name]()
    params = {"w": jnp.linspace(-1.0, 1.0, 5)}
    scheduled, unit = adam_jax.adamw(schedule, weight_decay=0.0), adam_jax.adam(1.0)
    s1, s2 = scheduled.init(params), unit.init(params)
    step1, step2 = jax.jit(scheduled.update), jax.jit(unit.update)
    rng = np.random.default_rng(0)
    for k in range(20):
        g = {"w": jnp.asarray(rng.standard_normal(5), jnp.float32)}
        u1, s1 = step1(g, s1, params)
        u2, s2 = step2(g, s2, params)
        lr = float(schedule(k))
        # atol: a schedule evaluated inside jit may round differently from the eager value
        # (e.g. 4.9e-11 instead of 0.0 at the end of a linear decay).
        chex.assert_trees_all_close(
            u1, jax.tree.map(lambda u, lr=lr: lr * u, u2), rtol=1e-5, atol=1e-9
        )


def test_first_update_uses_schedule_at_step_zero() -> None:
    """The very first update uses lr(0) (optax and PyTorch LambdaLR convention), not lr(1)."""
    schedule = optax.piecewise_constant_schedule(1.0, {1: 100.0})  # 1 at step 0, 100 after
    opt = adam_jax.adam(schedule)
    params = {"w": jnp.ones((2,))}
    u, state = opt.update({"w": jnp.asarray([1.0, -1.0])}, opt.init(params), params)
    np.testing.assert_allclose(np.asarray(u["w"]), [-1.0, 1.0], rtol=1e-6)
    u, state = opt.update({"w": jnp.asarray([1.0, -1.0])}, state, params)
    np.testing.assert_allclose(np.asarray(u["w"]), [-100.0, 100.0], rtol=1e-6)


def test_weight_decay_schedule_first_step() -> None:
    """add_decayed_weights with a schedule also uses wd(0) on the first update."""
    wd = optax.piecewise_constant_schedule(0.5, {1: 4.0})  # 0.5 at step 0, 0.5 * 4 = 2 after
    tx = adam_jax.add_decayed_weights(wd)
    params = {"w": jnp.asarray([2.0, -2.0])}
    zeros = {"w": jnp.zeros((2,))}
    u, state = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(u["w"]), [1.0, -1.0], rtol=1e-6)
    u, state = tx.update(zeros, state, params)
    np.testing.assert_allclose(np.asarray(u["w"]), [4.0, -4.0], rtol=1e-6)
