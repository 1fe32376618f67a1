"""Stable-SPAM beyond the generic table of ``tests/variants.py``.

The table checks every option against the float64 reference (``tests/references/stable_spam.py``)
and pytorch-optimizer. Here: that its cases clip and reset on the test problem, that the
statistics are per tensor (one value of shape ``(1,) * ndim`` each),
that the cosine of ``total_t`` is the authors' closed form, and ``Leaf.max`` per packed tensor
(``tests/test_variants_compat.py`` runs the rule on ``FlatParams`` against the tree).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from references.common import make_problem, run_reference
from references.stable_spam import authors_cosine
from variants import BY_NAME

import adam_jax
from adam_jax._src.variants.stable_spam import cosine_scale

STABLE_SPAM = BY_NAME["stable_spam"]
RESETTING = ("reset", "reset_often_cosine", "reset_counting_every_step", "amsgrad", "schedules")


@pytest.mark.parametrize("case", ("default", *RESETTING))
def test_the_cases_clip_and_reset_on_the_test_problem(case: str) -> None:
    problem = make_problem(seed=2, steps=300)
    ref = STABLE_SPAM.reference(**STABLE_SPAM.cases[case])
    run_reference(ref, problem, 300)
    assert ref.clipped > 5, ref.clipped
    assert ref.resets == (300 // ref.update_proj_gap if case in RESETTING else 0)


def test_the_cosine_is_the_authors_closed_form() -> None:
    t = np.arange(1, 40)
    ours = np.asarray(cosine_scale(jnp.asarray(t), 12, 0.3, jnp.float32))
    np.testing.assert_allclose(ours, [authors_cosine(int(s), 12, 0.3) for s in t], rtol=1e-6)
    assert ours[12] == pytest.approx(0.3 + 0.7 * (1 + math.cos(math.pi * 13 / 13)) / 2, abs=1e-6)
    assert ours[30] > ours[12]  # not clamped after T + 1: it rises again


def test_the_statistics_are_one_value_per_tensor() -> None:
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(5), "s": jnp.zeros(())}
    tx = adam_jax.scale_by_stable_spam()
    state = tx.init(params)
    grads = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.full(5, -2.0), "s": jnp.array(0.5)}
    _, state = tx.update(grads, state)
    assert state.m_max["w"].shape == (1, 1) and state.m_max["s"].shape == ()
    # (1 - gamma3) max|g| and (1 - gamma1) ||g|| (nothing clipped at the first step).
    assert float(state.m_max["w"][0, 0]) == pytest.approx(1e-3 * 11, rel=1e-6)
    norm = float(jnp.linalg.norm(grads["w"]))
    assert float(state.m_norm["w"][0, 0]) == pytest.approx(0.3 * norm, rel=1e-6)
    assert float(state.v_norm["b"][0]) == pytest.approx(0.1 * 20.0, rel=1e-6)


def test_leaf_max_is_per_packed_tensor() -> None:
    x = jnp.array([1.0, 5.0, 2.0, -1.0, 3.0])
    whole = adam_jax.rules.Leaf(param=None, decay=0.0, segments=None)
    packed = adam_jax.rules.Leaf(param=None, decay=0.0, segments=(2, 3))
    assert float(whole.max(x)) == 5.0
    np.testing.assert_array_equal(packed.max(x), [5.0, 5.0, 3.0, 3.0, 3.0])
