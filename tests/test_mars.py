"""MARS beyond the generic table of ``tests/variants.py``.

The table checks every option of the approximate form against the float64 reference
(``tests/references/mars.py``) and against pytorch-optimizer and timm on the standard problem
(a matrix, a vector and a scalar). Here:

* the exact form (``is_approx=False``), whose ``update`` takes the gradient of the step's batch
  at the previous params (``last_grad=``): against the reference, maximized too;
* params of three dimensions, which the authors train with AdamW (``only_2d=True``) and the
  ports with MARS (``only_2d=False``): against the reference and pytorch-optimizer;
* timm's float32 run (the table's float32 cases are pytorch-optimizer's);
* the clipping: a corrected gradient of norm above 1 is scaled to norm 1, one below is kept.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references.common import (
    import_reference_package,
    make_problem,
    run_jax,
    run_reference,
    run_torch,
)
from references.mars import RefMars, pytorch_optimizer_optimizer, timm_optimizer

import adam_jax


def _relative_error(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    return max(
        float(np.max(np.abs(actual[k] - expected[k])))
        / max(float(np.max(np.abs(expected[k]))), 1e-300)
        for k in expected
    )


def _run_exact(options: dict[str, Any], steps: int) -> tuple[dict, dict]:
    """The exact form on the standard problem, ours and the reference's: at step ``k`` the
    previous gradient is batch ``k``'s at the params before the previous step."""
    problem = make_problem(seed=7, steps=steps)
    keys = problem.keys
    tx = adam_jax.mars(1e-2, is_approx=False, **options)
    update = jax.jit(tx.update)
    ref = RefMars(1e-2, is_approx=False, **options)
    ours = {k: jnp.asarray(problem.params[k], jnp.float64) for k in keys}
    theirs = {k: np.asarray(problem.params[k], np.float64) for k in keys}
    ref.init([theirs[k] for k in keys])
    state = tx.init(ours)
    previous_ours, previous_theirs = ours, theirs
    traj_ours, traj_theirs = {k: [] for k in keys}, {k: [] for k in keys}
    for step in range(steps):
        g = problem.grad(ours, step, xp=jnp)
        last = problem.grad(previous_ours, step, xp=jnp)
        updates, state = update(g, state, ours, last_grad=last)
        previous_ours = ours
        ours = jax.tree.map(lambda p, u: p + u, ours, updates)

        g_ref = problem.grad(theirs, step)
        last_ref = problem.grad(previous_theirs, step)
        u_ref = ref.update([g_ref[k] for k in keys], [theirs[k] for k in keys],
                           [last_ref[k] for k in keys])  # fmt: skip
        previous_theirs = theirs
        theirs = {k: theirs[k] + u for k, u in zip(keys, u_ref, strict=True)}
        for k in keys:
            traj_ours[k].append(np.asarray(ours[k]))
            traj_theirs[k].append(theirs[k])
    return (
        {k: np.stack(v) for k, v in traj_ours.items()},
        {k: np.stack(v) for k, v in traj_theirs.items()},
    )


@pytest.mark.parametrize(
    "options",
    [{}, {"weight_decay": 0.1, "amsgrad": True}, {"maximize": True, "optimize_1d": True}],
    ids=["default", "decay_amsgrad", "maximize_optimize_1d"],
)
def test_exact_form_against_reference(options: dict[str, Any], x64: None) -> None:
    ours, theirs = _run_exact(options, steps=100)
    assert _relative_error(ours, theirs) < 1e-8


def test_exact_form_differs_from_the_approximate_one(x64: None) -> None:
    """The previous gradient at the same batch is not the previous batch's gradient."""
    exact, _ = _run_exact({}, steps=20)
    problem = make_problem(seed=7, steps=20)
    approx, _, _ = run_jax(adam_jax.mars(1e-2), problem, 20, dtype=np.float64)
    assert not np.allclose(exact["w"], approx["w"][1:], rtol=1e-6)
    # AdamW's params do not use the previous gradient: the same in both forms.
    np.testing.assert_allclose(exact["b"], approx["b"][1:], rtol=1e-12)


def test_exact_form_needs_the_previous_gradient() -> None:
    tx = adam_jax.mars(1e-2, is_approx=False)
    params = {"w": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match="last_grad"):
        tx.update(params, tx.init(params), params)


SHAPES = {"b": (4,), "k": (2, 3, 2), "w": (3, 4)}


@pytest.mark.parametrize("only_2d", [True, False])
def test_params_of_three_dimensions_against_reference(only_2d: bool, x64: None) -> None:
    problem = make_problem(seed=3, steps=200, shapes=SHAPES)
    options = {"only_2d": only_2d, "weight_decay": 0.1}
    expected, _ = run_reference(RefMars(1e-2, **options), problem, 200)
    traj, _, _ = run_jax(adam_jax.mars(1e-2, **options), problem, 200, dtype=np.float64)
    assert _relative_error(traj, expected) < 1e-8
    # The authors' AdamW on the 3-D param is not the ports' MARS there.
    other, _ = run_reference(RefMars(1e-2, only_2d=not only_2d, weight_decay=0.1), problem, 200)
    assert _relative_error({"k": other["k"]}, {"k": expected["k"]}) > 1e-3


def test_params_of_three_dimensions_against_pytorch_optimizer(x64: None) -> None:
    torch = import_reference_package("torch")
    problem = make_problem(seed=4, steps=200, shapes=SHAPES)
    options = {"only_2d": False, "eps_placement": "keras", "weight_decay": 0.1}
    expected = run_torch(
        lambda params: pytorch_optimizer_optimizer(params, learning_rate=1e-2, **options),
        problem,
        200,
    )
    traj, _, _ = run_jax(adam_jax.mars(1e-2, **options), problem, 200, dtype=np.float64)
    assert _relative_error(traj, expected) < 1e-8
    with pytest.raises(NotImplementedError, match="3\\+ dimensions"):
        pytorch_optimizer_optimizer(
            [torch.zeros((2, 2, 2))], learning_rate=1e-2, eps_placement="keras"
        )


@pytest.mark.parametrize(
    "options",
    [
        {"correct_first_step": False, "weight_decay_1d": 0.0},
        {"correct_first_step": False, "weight_decay": 0.1, "weight_decay_1d": 0.1, "lr_1d": 5e-3},
    ],
    ids=["timm", "timm_decay"],
)
def test_float32_no_worse_than_timm(options: dict[str, Any], x64: None) -> None:
    problem = make_problem(seed=5, steps=300)
    expected, _ = run_reference(RefMars(1e-2, **options), problem, 300)
    theirs = run_torch(
        lambda params: timm_optimizer(params, learning_rate=1e-2, **options),
        problem,
        300,
        "float32",
    )
    ours, _, _ = run_jax(
        adam_jax.mars(1e-2, **options), problem, 300, dtype=jnp.float32, exact_grads=True
    )
    ours = {k: v.astype(np.float64) for k, v in ours.items()}
    assert _relative_error(ours, expected) <= _relative_error(theirs, expected)


@pytest.mark.parametrize(("scale", "clipped"), [(0.1, False), (2.0, True)])
def test_the_corrected_gradient_is_clipped_to_norm_one(scale: float, clipped: bool) -> None:
    """First step: c = (1 + gamma b1 / (1 - b1)) g, scaled to norm 1 where its norm is above 1
    (the momentum is (1 - b1) c)."""
    g = scale * jnp.array([[0.6, 0.8]])
    tx = adam_jax.scale_by_mars(weight_decay_1d=0.0)
    _, state = tx.update(g, tx.init(jnp.zeros((1, 2))))
    corrected = (1 + 0.025 * 0.95 / 0.05) * g
    c = corrected / jnp.linalg.norm(corrected) if clipped else corrected
    np.testing.assert_allclose(state.mu, 0.05 * c, rtol=1e-6)
    assert bool(jnp.linalg.norm(corrected) > 1) == clipped


def test_lion_and_shampoo_are_refused() -> None:
    for kind in ("mars-lion", "mars-shampoo"):
        with pytest.raises(ValueError, match="not built"):
            adam_jax.mars(1e-2, mars_type=kind)


def test_exact_form_under_inject_hyperparams() -> None:
    """``last_grad`` passes through optax's wrappers (here ``inject_hyperparams``)."""
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
    plain = adam_jax.mars(1e-2, is_approx=False, weight_decay=0.1)
    injected = optax.inject_hyperparams(adam_jax.mars)(
        learning_rate=1e-2, is_approx=False, weight_decay=0.1
    )
    results = []
    for tx in (plain, injected):
        p, state, previous = params, tx.init(params), params
        for step in range(3):
            grads = jax.tree.map(lambda x, s=step: jnp.sin((s + 1.0) * x), p)
            last = jax.tree.map(lambda x, s=step: jnp.sin((s + 1.0) * x), previous)
            updates, state = tx.update(grads, state, p, last_grad=last)
            previous, p = p, jax.tree.map(lambda x, u: x + u, p, updates)
        results.append(p)
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("correct_first_step", [True, False])
def test_first_correction(correct_first_step: bool) -> None:
    """The authors' first correction takes g_0 = 0, c = (1 + gamma b1 / (1 - b1)) g; timm's
    takes c = g (both below norm 1 here: no clipping)."""
    g = jnp.array([[0.03, 0.04]])
    tx = adam_jax.scale_by_mars(weight_decay_1d=0.0, correct_first_step=correct_first_step)
    _, state = tx.update(g, tx.init(jnp.zeros((1, 2))))
    factor = 1 + 0.025 * 0.95 / 0.05 if correct_first_step else 1.0
    np.testing.assert_allclose(state.mu, 0.05 * factor * g, rtol=1e-6)
    # From the second step on, both take the previous gradient.
    _, state2 = tx.update(2 * g, state)
    c2 = 2 * g + 0.025 * 0.95 / 0.05 * g
    np.testing.assert_allclose(state2.mu, 0.95 * state.mu + 0.05 * c2, rtol=1e-6)
