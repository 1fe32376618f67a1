"""SOAP beyond the generic table of ``tests/variants.py``.

The table checks every option against the float64 reference (``tests/references/soap.py``) on
the standard problem, whose factors are full rank or short of it by one. Here:

* the options whose factors lack more rank at the first gradient (``precondition_1d``: a
  vector's factor :math:`gg^\\top` has rank one; ``merge_dims`` merging a matrix into one
  dimension), whose first eigenbasis is arbitrary: against the reference with the basis
  pinned to ours after the first step;
* tensors of three dimensions, merged or not, whose factors are full rank: against the
  reference;
* invariants: the bases stay orthogonal, the first step is zero (decay included), a loss
  decreases in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references.common import make_problem, run_jax, run_reference
from references.soap import RefSoap

import adam_jax
from adam_jax._src.variants.soap import SoapLayout


def _relative_error(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    return max(
        float(np.max(np.abs(actual[k] - expected[k])))
        / max(float(np.max(np.abs(expected[k]))), 1e-300)
        for k in expected
    )


@pytest.mark.parametrize(
    "options",
    [{"precondition_1d": True}, {"merge_dims": True, "precondition_frequency": 15}],
    ids=["precondition_1d", "merge_dims"],
)
def test_rank_deficient_factors_with_the_basis_pinned(options: dict, x64: None) -> None:
    """After the first step the reference takes our eigenbases (its own are another choice
    in the null space of a rank-deficient factor); the next steps, refreshes included, agree.
    The first refresh comes when the factors are full rank (a refresh of a rank-deficient
    factor, one power-iteration step, leaves the null space's basis arbitrary again)."""
    steps = 40
    problem = make_problem(seed=3, steps=steps)
    keys = problem.keys
    tx = adam_jax.soap(1e-2, weight_decay=0.05, **options)
    ref = RefSoap(learning_rate=1e-2, weight_decay=0.05, **options)
    ours = {k: jnp.asarray(problem.params[k], jnp.float64) for k in keys}
    theirs = {k: np.asarray(problem.params[k], np.float64) for k in keys}
    state, update = tx.init(ours), jax.jit(tx.update)
    ref.init([theirs[k] for k in keys])
    layout = SoapLayout(
        10000, options.get("merge_dims", False), options.get("precondition_1d", False)
    )
    for step in range(steps):
        updates, state = update(problem.grad(ours, step, xp=jnp), state, ours)
        ours = optax.apply_updates(ours, updates)
        grads = problem.grad(theirs, step)
        ref_updates = ref.update([grads[k] for k in keys], [theirs[k] for k in keys])
        theirs = {k: theirs[k] + u for k, u in zip(keys, ref_updates, strict=True)}
        if step == 0:
            for i, k in enumerate(keys):
                pinned = layout.unpack(np.asarray(state[0].q[k]), problem.params[k].shape)
                if any(q is not None for q in pinned):  # (a scalar's 1 x 1 basis is 1)
                    ref.state[i]["Q"] = pinned
    assert _relative_error({k: np.asarray(v) for k, v in ours.items()}, theirs) < 1e-8


@pytest.mark.parametrize(
    ("shape", "options"),
    [((2, 3, 4), {}), ((2, 2, 4), {"merge_dims": True, "max_precond_dim": 4})],
    ids=["3d", "3d_merged"],
)
def test_three_dimensional_leaves_against_the_reference(
    shape: tuple, options: dict, x64: None
) -> None:
    """A tensor whose unfoldings are all wide (full-rank factors), and one that merges into a
    square matrix ((2, 2, 4) -> (4, 4)), beside the standard vector and scalar."""
    steps = 60
    problem = make_problem(seed=4, steps=steps, shapes={"b": (5,), "s": (), "w": shape})
    expected, _ = run_reference(RefSoap(learning_rate=1e-2, **options), problem, steps)
    traj, _, _ = run_jax(adam_jax.soap(1e-2, **options), problem, steps, dtype=np.float64)
    assert _relative_error(traj, expected) < 1e-8


def test_bases_stay_orthogonal_and_the_loss_decreases() -> None:
    """float32 least squares ``|X W + b - Y|^2`` with W (8, 6): the bases are orthogonal after
    refreshes, and the loss falls to a tenth of its start."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    y = x @ jnp.asarray(rng.standard_normal((8, 6)), jnp.float32) + 0.5
    params = {"w": jnp.zeros((8, 6)), "b": jnp.zeros(6)}

    def loss(p: Any) -> jax.Array:
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    tx = adam_jax.soap(0.1, precondition_frequency=5, precondition_1d=True)
    state = tx.init(params)

    @jax.jit
    def step(p: Any, state: Any) -> tuple[Any, Any]:
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        return optax.apply_updates(p, updates), state

    start = float(loss(params))
    for _ in range(60):
        params, state = step(params, state)
    assert float(loss(params)) < 0.1 * start
    layout = SoapLayout(10000, False, True)
    for k, p in params.items():
        for q in layout.unpack(np.asarray(state[0].q[k]), p.shape):
            assert q is not None
            np.testing.assert_allclose(q.T @ q, np.eye(q.shape[0]), atol=1e-5)


def test_first_step_is_zero_even_with_weight_decay() -> None:
    tx = adam_jax.soap(1e-2, weight_decay=0.5)
    params = {"w": jnp.ones((3, 3))}
    updates, state = tx.update({"w": jnp.ones((3, 3))}, tx.init(params), params)
    assert not np.any(np.asarray(updates["w"]))
    assert int(state[0].count) == 1
    updates, _ = tx.update({"w": jnp.ones((3, 3))}, state, params)
    assert np.all(np.asarray(updates["w"]) < 0)


def test_complex_params_are_refused() -> None:
    with pytest.raises(ValueError, match="complex"):
        adam_jax.soap(1e-2).init({"w": jnp.ones((2, 2), jnp.complex64)})
