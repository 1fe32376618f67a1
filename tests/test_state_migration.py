"""A run can switch optimizer library mid-training, through an orbax checkpoint.

Train with optax's alias, save its state with orbax, restore it into adam_jax's alias of the same
name (and the other way round), continue, and compare with the run that never switched. The
states are the same pytrees (optax's types), so the restore needs no conversion. In float64 the
two libraries agree to rounding, so the switched run matches the uninterrupted one to 1e-12; in
float32 they differ by optax's rounding of ``1 - b**t`` (about 1e-5 relative per update), which
bounds the difference.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import adam_jax

STEPS_BEFORE, STEPS_AFTER = 20, 30

PAIRS: dict[str, tuple[Callable[[], optax.GradientTransformation], ...]] = {
    "adamw": (
        lambda: optax.adamw(1e-2, weight_decay=1e-2),
        lambda: adam_jax.adamw(1e-2, weight_decay=1e-2),
    ),
    "adamw_schedules_mask": (
        lambda: optax.adamw(
            optax.cosine_decay_schedule(1e-2, 60),
            weight_decay=lambda count: 1e-2 / (1 + count),
            mask={"w": True, "b": False},
        ),
        lambda: adam_jax.adamw(
            optax.cosine_decay_schedule(1e-2, 60),
            weight_decay=lambda count: 1e-2 / (1 + count),
            mask={"w": True, "b": False},
        ),
    ),
    "nadam": (lambda: optax.nadam(1e-2), lambda: adam_jax.nadam(1e-2)),
}


def _problem(dtype) -> tuple[dict, Callable]:
    rng = np.random.default_rng(3)
    target = {"w": rng.standard_normal((6, 5)), "b": rng.standard_normal(5)}
    params = jax.tree.map(lambda t: jnp.zeros(t.shape, dtype), target)

    def loss(p):
        return sum(jnp.sum((p[k] - target[k].astype(dtype)) ** 4) for k in p)

    return params, loss


def _train(tx, params, state, loss, steps: int):
    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def _switched_run(first, second, dtype, directory: Path) -> tuple[dict, dict]:
    """(params after switching library through a checkpoint, params of the unswitched run)."""
    params0, loss = _problem(dtype)
    params, state = _train(first(), params0, first().init(params0), loss, STEPS_BEFORE)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "state", {"params": params, "opt_state": state})
    checkpointer.wait_until_finished()
    target = {"params": params0, "opt_state": second().init(params0)}
    restored = checkpointer.restore(
        directory / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    )
    assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(target["opt_state"])
    switched, _ = _train(second(), restored["params"], restored["opt_state"], loss, STEPS_AFTER)
    unswitched, _ = _train(first(), params, state, loss, STEPS_AFTER)
    return switched, unswitched


def _max_difference(a: dict, b: dict) -> float:
    return max(float(jnp.max(jnp.abs(a[k] - b[k]))) for k in a)


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("direction", ["optax_to_adam_jax", "adam_jax_to_optax"])
def test_switch_library_in_float64(name: str, direction: str, tmp_path: Path, x64: None) -> None:
    optax_tx, ours = PAIRS[name]
    first, second = (optax_tx, ours) if direction == "optax_to_adam_jax" else (ours, optax_tx)
    switched, unswitched = _switched_run(first, second, jnp.float64, tmp_path)
    assert _max_difference(switched, unswitched) < 1e-12


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("direction", ["optax_to_adam_jax", "adam_jax_to_optax"])
def test_switch_library_in_float32(name: str, direction: str, tmp_path: Path) -> None:
    """Each continued update differs by at most optax's float32 error (1e-5 relative) times the
    learning rate (1e-2): over 30 steps the params differ by less than 30 * 1e-2 * 1e-5."""
    optax_tx, ours = PAIRS[name]
    first, second = (optax_tx, ours) if direction == "optax_to_adam_jax" else (ours, optax_tx)
    switched, unswitched = _switched_run(first, second, jnp.float32, tmp_path)
    assert _max_difference(switched, unswitched) < STEPS_AFTER * 1e-2 * 1e-5
