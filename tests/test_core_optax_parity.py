"""adam_jax gives the same numbers as optax where optax implements the same algorithm.

Checked for ``adam``, ``adamw``, ``nadam``, ``nadamw``, ``adamax``, ``adamaxw`` and the bare
``scale_by_adam`` / ``scale_by_adamax``, with constant and scheduled learning rates (and a
weight-decay schedule), over 300 steps on a random pytree: the per-step updates and the whole
parameter trajectory, in float64 (1e-12 relative) and float32 (1e-5 relative: adam_jax computes
the bias corrections more precisely than optax, so the two may differ by a few ulps per step,
never more).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import chex
import numpy as np
import optax
import pytest
from references.common import make_problem, run_jax

import adam_jax

STEPS = 300
LR = 1e-2


def _lr_schedule() -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=LR, warmup_steps=30, decay_steps=STEPS, end_value=1e-4
    )


def _wd_schedule() -> optax.Schedule:
    return optax.linear_schedule(init_value=1e-2, end_value=1e-3, transition_steps=STEPS)


# name -> (adam_jax factory, optax factory); each gets the learning rate (constant or schedule).
CASES: dict[str, tuple[Callable, Callable]] = {
    "adam": (lambda lr: adam_jax.adam(lr), lambda lr: optax.adam(lr)),
    "adam_b": (
        lambda lr: adam_jax.adam(lr, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-10),
        lambda lr: optax.adam(lr, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-10),
    ),
    "adamw": (
        lambda lr: adam_jax.adamw(lr, weight_decay=1e-2),
        lambda lr: optax.adamw(lr, weight_decay=1e-2),
    ),
    "adamw_mask_wd_schedule": (
        lambda lr: adam_jax.adamw(
            lr, weight_decay=_wd_schedule(), mask={"b": False, "s": True, "w": True}
        ),
        lambda lr: optax.adamw(
            lr, weight_decay=_wd_schedule(), mask={"b": False, "s": True, "w": True}
        ),
    ),
    "nadam": (lambda lr: adam_jax.nadam(lr), lambda lr: optax.nadam(lr)),
    "adam_nesterov": (
        lambda lr: adam_jax.adam(lr, nesterov=True),
        lambda lr: optax.adam(lr, nesterov=True),
    ),
    "nadamw": (
        lambda lr: adam_jax.nadamw(lr, weight_decay=1e-2),
        lambda lr: optax.nadamw(lr, weight_decay=1e-2),
    ),
    "adamax": (lambda lr: adam_jax.adamax(lr), lambda lr: optax.adamax(lr)),
    "adamaxw": (
        lambda lr: adam_jax.adamaxw(lr, weight_decay=1e-2),
        lambda lr: optax.adamaxw(lr, weight_decay=1e-2),
    ),
    "scale_by_adam": (
        lambda lr: optax.chain(adam_jax.scale_by_adam(), optax.scale(-lr)),
        lambda lr: optax.chain(optax.scale_by_adam(), optax.scale(-lr)),
    ),
    "scale_by_adamax": (
        lambda lr: optax.chain(adam_jax.scale_by_adamax(), optax.scale(-lr)),
        lambda lr: optax.chain(optax.scale_by_adamax(), optax.scale(-lr)),
    ),
}

SCHEDULED = ["adam", "adamw", "nadam", "adamax", "adamaxw"]
FLOAT32 = ["adam", "adamw_mask_wd_schedule", "nadam", "adamax", "adamaxw", "scale_by_adam"]
FLOAT32_SCHEDULED = ["adam", "adamw"]
# One float32 ulp of an O(1) parameter per step, accumulated over the whole run.
F32_TRAJ_ATOL = STEPS * float(np.finfo(np.float32).eps)


def _compare(
    name: str, lr, dtype, rtol: float, atol: float, upd_atol: float, open_loop: bool
) -> None:
    """Compares closed-loop trajectories and per-step updates with optax's.

    With ``open_loop`` the updates are compared on a gradient sequence that does not depend on
    the params: in the closed loop a one-ulp difference in a float32 parameter changes the next
    gradient, and Adam's update is ill-conditioned where the first moment crosses zero, so in
    float32 per-step updates are only meaningful when both optimizers see the same gradients.
    ``atol`` is in units of the parameter scale (O(1)); ``upd_atol`` in units of the
    direction's scale (O(1)), i.e. updates are compared with ``upd_atol * LR``.
    """
    ours_factory, theirs_factory = CASES[name]
    seed = zlib.crc32(name.encode()) % 1000
    problem = make_problem(seed=seed, steps=STEPS, coupled=not open_loop)
    traj, upd, _ = run_jax(ours_factory(lr), problem, STEPS, dtype=dtype)
    ref_traj, ref_upd, _ = run_jax(theirs_factory(lr), problem, STEPS, dtype=dtype)
    for k in traj:
        assert traj[k].dtype == np.dtype(dtype), (k, traj[k].dtype)
        assert upd[k].dtype == np.dtype(dtype), (k, upd[k].dtype)
    chex.assert_trees_all_close(upd, ref_upd, rtol=rtol, atol=upd_atol * LR)
    if open_loop:
        problem = make_problem(seed=seed, steps=STEPS)
        traj, _, _ = run_jax(ours_factory(lr), problem, STEPS, dtype=dtype)
        ref_traj, _, _ = run_jax(theirs_factory(lr), problem, STEPS, dtype=dtype)
    chex.assert_trees_all_close(traj, ref_traj, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_constant_lr(name: str, x64: None) -> None:
    """float64: updates and trajectories equal optax's to ~1e-12 relative."""
    _compare(name, LR, np.float64, rtol=1e-12, atol=1e-13, upd_atol=1e-13, open_loop=False)


@pytest.mark.parametrize("name", SCHEDULED)
def test_float64_scheduled_lr(name: str, x64: None) -> None:
    """float64 with a warmup-cosine learning-rate schedule (scale_by_learning_rate path)."""
    _compare(
        name,
        _lr_schedule(),
        np.float64,
        rtol=1e-12,
        atol=1e-13,
        upd_atol=1e-13,
        open_loop=False,
    )


@pytest.mark.parametrize("name", FLOAT32)
def test_float32_constant_lr(name: str) -> None:
    """float32: the same as optax up to accumulated rounding (rtol 1e-5; trajectories within
    one ulp of the parameter scale per step; open-loop updates within 1e-5 relative)."""
    _compare(name, LR, np.float32, rtol=1e-5, atol=F32_TRAJ_ATOL, upd_atol=1e-6, open_loop=True)


@pytest.mark.parametrize("name", FLOAT32_SCHEDULED)
def test_float32_scheduled_lr(name: str) -> None:
    """float32 with a learning-rate schedule."""
    _compare(
        name,
        _lr_schedule(),
        np.float32,
        rtol=1e-5,
        atol=F32_TRAJ_ATOL,
        upd_atol=1e-6,
        open_loop=True,
    )


def test_state_layout_matches_optax_scale_by_adam(x64: None) -> None:
    """scale_by_adam's state has count/mu/nu like optax's, with equal values after 10 steps."""
    problem = make_problem(seed=3, steps=10)
    _, _, ours = run_jax(adam_jax.scale_by_adam(), problem, 10, dtype=np.float64)
    _, _, theirs = run_jax(optax.scale_by_adam(), problem, 10, dtype=np.float64)
    assert int(ours.count) == int(theirs.count) == 10
    chex.assert_trees_all_close(ours.mu, theirs.mu, rtol=1e-12, atol=1e-15)
    chex.assert_trees_all_close(ours.nu, theirs.nu, rtol=1e-12, atol=1e-15)
