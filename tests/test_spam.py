"""SPAM beyond the generic table of ``tests/variants.py``.

The table checks every option against the float64 reference (``tests/references/spam.py``)
and pytorch-optimizer. Here: that its cases exercise what they are named after on the test
problem (spikes clipped, moments reset), that the warm-up after a reset is the authors'
cosine, and that a reset restarts the moments from zero and a spike is clipped to
``sign(g) sqrt(threshold v)``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from reference import make_problem, run_reference
from references.spam import RefSpam, authors_death_rate
from variants import BY_NAME

import adam_jax
from adam_jax._src.variants.spam import warmup_scale

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
