"""SPAM beyond the generic table of ``tests/variants.py``.

The table checks every option against the float64 reference (``tests/references/spam.py``)
and pytorch-optimizer. Here: that its cases exercise what they are named after on the test
problem (spikes clipped, moments reset), that the warm-up after a reset is the authors'
cosine, and that a reset restarts the moments from zero and a spike is clipped to
``sign(g) sqrt(threshold v)``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references.common import make_problem, run_reference
from references.spam import RefSpam, authors_death_rate
from variants import BY_NAME

import adam_jax
from adam_jax._src.variants.spam import sample_entries, warmup_scale

SPAM = BY_NAME["spam"]
CLIPPING = ("clip", "reset_and_clip")
RESETTING = ("reset", "reset_and_clip", "reset_every_step", "no_bias_correction", "schedules")


@pytest.mark.parametrize("case", CLIPPING + RESETTING)
def test_the_cases_clip_and_reset_on_the_test_problem(case: str) -> None:
    """The reference, on the problem of the table, clips entries where its case clips and
    resets where its case resets (the default thresholds would never clip there)."""
    problem = make_problem(seed=1, steps=300)
    ref = SPAM.reference(**SPAM.cases[case])
    run_reference(ref, problem, 300)
    if case in CLIPPING:
        assert ref.clipped > 10, ref.clipped
    if case in RESETTING:
        assert ref.resets >= 4, ref.resets
    default = RefSpam(1e-2)
    run_reference(default, problem, 300)
    assert default.clipped == 0 and default.resets == 0


def test_warmup_is_the_authors_cosine_after_each_reset() -> None:
    """0.01 at a reset of a step >= 1, the cosine for W steps, 1 otherwise (before the first
    reset too)."""
    delta_t, warmup = 5, 3
    scales = np.asarray(warmup_scale(jnp.arange(20), delta_t, warmup, jnp.float32))
    ref = RefSpam(None, delta_t=delta_t, warmup_steps=warmup)
    ref.init([np.zeros(1)])
    expected = []
    for _ in range(20):
        expected.append(1 - authors_death_rate(ref.current_step, warmup))
        ref.update([np.ones(1)], [np.zeros(1)])
    np.testing.assert_allclose(scales, expected, rtol=1e-6)
    assert scales[4] == pytest.approx(0.01, rel=1e-5)
    assert scales[5] == pytest.approx(1 - 0.99 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-5)
    assert np.all(scales[:4] == 1) and np.all(scales[7:9] == 1)


def test_a_reset_restarts_the_moments_and_a_spike_is_clipped() -> None:
    tx = adam_jax.scale_by_spam(delta_t=3, warmup_steps=0, threshold=4.0, grad_accu_steps=2)
    state = tx.init(jnp.zeros(2))
    _, state = tx.update(jnp.array([1.0, -1.0]), state)
    nu = state.nu
    # Step 2 (t % 3 = 2 >= 2): the second entry spikes (100 > 4 nu) and is clipped.
    _, state = tx.update(jnp.array([1.0, -10.0]), state)
    bound = -np.sqrt(4.0 * float(nu[1]))
    np.testing.assert_allclose(state.mu[1], 0.9 * (-0.1) + 0.1 * bound, rtol=1e-6)
    # Step 3 (t % 3 = 0): the moments restart from zero, no clipping.
    _, state = tx.update(jnp.array([2.0, -10.0]), state)
    np.testing.assert_allclose(state.mu, [0.2, -1.0], rtol=1e-6)
    np.testing.assert_allclose(state.nu, [0.004, 0.1], rtol=1e-6)


def _sparse_run(steps: int, **options: Any) -> tuple[list[Any], list[Any], Any]:
    """``steps`` jitted steps of sparse SPAM (a gradient of ones) on two equal matrices and a
    vector; the entries of each step and the updates."""
    params = {"a": jnp.zeros((8, 16)), "b": jnp.zeros((8, 16)), "v": jnp.zeros(16)}
    tx = adam_jax.spam(1e-2, density=0.25, delta_t=5, warmup_steps=2, **options)
    state = tx.init(params)
    step = jax.jit(tx.update)
    entries, updates = [], []
    for _ in range(steps):
        update, state = step(jax.tree.map(jnp.ones_like, params), state, params)
        entries.append(jax.tree.map(np.asarray, state[-1].entries))
        updates.append(update)
    return entries, updates, state[-1]


def test_sparse_leaves_keep_and_step_only_their_sampled_entries() -> None:
    """Each matrix keeps moments for int(density * size) distinct entries, drawn at the first
    step and anew at each reset (t = 5, 10), other draws for other matrices and keys, and its
    update is zero elsewhere; the vector stays dense."""
    entries, updates, state = _sparse_run(12)
    assert state.mu["a"].shape == state.nu["a"].shape == (32,)
    assert state.entries["a"].dtype == jnp.int32
    assert isinstance(state.entries["v"], optax.MaskedNode)
    assert state.mu["v"].shape == (16,)
    for drawn, update in zip(entries, updates, strict=True):
        for name in ("a", "b"):
            chosen = drawn[name]
            assert np.all(np.diff(chosen) > 0) and chosen[0] >= 0 and chosen[-1] < 128
            moved = np.flatnonzero(np.asarray(update[name]).reshape(-1))
            np.testing.assert_array_equal(moved, chosen)
        assert not np.array_equal(drawn["a"], drawn["b"])
        assert np.all(np.asarray(update["v"]) != 0)
    changed = [not np.array_equal(entries[k]["a"], entries[k - 1]["a"]) for k in range(1, 12)]
    assert [k for k, c in enumerate(changed, start=1) if c] == [4, 9]
    same_key, _, _ = _sparse_run(3)
    other_key, _, _ = _sparse_run(3, key=1)
    np.testing.assert_array_equal(same_key[0]["a"], entries[0]["a"])
    assert not np.array_equal(other_key[0]["a"], entries[0]["a"])


def test_sampled_entries_are_uniform_without_repeats() -> None:
    """Over 4000 keys, each of 10 entries is among 3 drawn about 1200 times (binomial sd 29)."""
    keys = jax.random.split(jax.random.key(0), 4000)
    drawn = np.asarray(jax.vmap(lambda k: sample_entries(k, 10, 3))(keys))
    assert np.all(np.diff(drawn, axis=1) > 0)
    counts = np.bincount(drawn.reshape(-1), minlength=10)
    assert np.all(np.abs(counts - 1200) < 5 * 29), counts


@pytest.mark.parametrize(("mu_dtype", "bytes_per_param"), [(None, 12), (jnp.bfloat16, 10)])
def test_sparse_state_bytes(mu_dtype: Any, bytes_per_param: int) -> None:
    """A matrix at density 1/4 keeps its two moments and int32 indices for a quarter of its
    entries: 12 * 0.25 = 3 bytes per parameter in float32 (2.5 with bfloat16 momentum)."""
    tx = adam_jax.spam(1e-3, density=0.25, mu_dtype=mu_dtype)
    state = tx.init({"w": jnp.zeros((64, 64))})[-1]
    stored = sum(x.nbytes for x in jax.tree.leaves((state.mu, state.nu, state.entries)))
    assert stored == bytes_per_param * 64 * 64 // 4


def test_sparse_moments_refuse_what_they_cannot_keep() -> None:
    params = {"w": jnp.zeros((8, 16))}
    with pytest.raises(ValueError, match="FlatParams"):
        adam_jax.spam(1e-3, density=0.5).init(adam_jax.FlatParams.from_tree(params))
    with pytest.raises(ValueError, match="FactoredStorage"):
        adam_jax.spam(1e-3, density=0.5, nu_dtype=adam_jax.factored_second_moment(2)).init(params)
    # A dense leaf may keep a reducing storage.
    tx = adam_jax.spam(
        1e-3, density=0.5, sparse_leaves={"w": False}, nu_dtype=adam_jax.factored_second_moment(2)
    )
    assert sum(x.size for x in jax.tree.leaves(tx.init(params)[-1].nu["w"])) == 8 + 16


def test_inject_hyperparams_with_density() -> None:
    """Injected, the density is an array: concrete when the state is made eagerly, traced under
    a jitted init, which needs it static."""
    params = {"w": jnp.zeros((8, 16))}
    tx = optax.inject_hyperparams(adam_jax.spam)(learning_rate=1e-2, density=0.5)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)({"w": jnp.ones((8, 16))}, state, params)
    assert int(jnp.sum(updates["w"] != 0)) == 64
    with pytest.raises(ValueError, match="static_args"):
        jax.jit(tx.init)(params)
    static = optax.inject_hyperparams(adam_jax.spam, static_args=("density",))
    state = jax.jit(static(learning_rate=1e-2, density=0.5).init)(params)
    assert state.inner_state[-1].mu["w"].shape == (64,)


@pytest.mark.parametrize("case", ["density", "density_clip_decay", "sparse_leaves"])
def test_the_density_cases_move_only_sampled_entries_on_the_test_problem(case: str) -> None:
    """In the reference, the matrix of the table's problem (3 x 4) moves int(density * 12)
    entries at each step, a set that is redrawn within the 60 steps."""
    options = SPAM.cases[case]
    _, updates = run_reference(SPAM.reference(**options), make_problem(seed=1, steps=60), 60)
    moved = np.asarray(updates["w"]).reshape(60, -1) != 0
    assert np.all(moved.sum(axis=1) == int(options["density"] * 12))
    assert len({row.tobytes() for row in moved}) > 1
