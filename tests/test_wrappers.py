"""The wrappers and additions for any optimizer: ``clip_update_rms``, ``skip_loss_spikes`` and
``cautious_weight_decay``, each against a float64 NumPy reference, with their edge cases
(zero, complex and low-precision updates; non-finite losses; masks and schedules) and their
refusals of bad hyperparameters."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax


def _tree(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "small": jnp.asarray(rng.normal(0.0, 0.1, (4, 3)), jnp.float32),
        "large": jnp.asarray(rng.normal(0.0, 5.0, (7,)), jnp.float32),
        "nested": {"mid": jnp.asarray(rng.normal(0.0, 1.0, (2, 5)), jnp.float32)},
    }


# -- clip_update_rms -------------------------------------------------------------------------


def _clip_reference(u: np.ndarray, max_rms: float) -> np.ndarray:
    u = np.asarray(u, np.complex128 if np.iscomplexobj(u) else np.float64)
    rms = math.sqrt(float(np.mean(np.abs(u) ** 2)))
    return u * (max_rms / rms) if rms > max_rms else u


@pytest.mark.parametrize("max_rms", [0.05, 1.0, 3.0])
def test_clip_update_rms_matches_the_float64_reference(max_rms: float) -> None:
    tx = adam_jax.clip_update_rms(max_rms)
    updates = _tree()
    state = tx.init(updates)
    assert state == optax.EmptyState()
    clipped, new_state = jax.jit(tx.update)(updates, state)
    assert new_state == optax.EmptyState()
    for got, u in zip(jax.tree.leaves(clipped), jax.tree.leaves(updates), strict=True):
        expected = _clip_reference(np.asarray(u), max_rms)
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=1e-6, atol=1e-9)
        got_rms = float(np.sqrt(np.mean(np.asarray(got, np.float64) ** 2)))
        assert got_rms <= max_rms * (1 + 1e-6)


def test_clip_update_rms_leaves_zero_updates_at_zero() -> None:
    tx = adam_jax.clip_update_rms(1.0)
    updates = {"z": jnp.zeros((3, 2)), "empty_of_signal": jnp.zeros(1)}
    clipped, _ = tx.update(updates, tx.init(updates))
    for leaf in jax.tree.leaves(clipped):
        assert jnp.array_equal(leaf, jnp.zeros_like(leaf))


def test_clip_update_rms_uses_the_modulus_of_complex_updates() -> None:
    rng = np.random.default_rng(1)
    u = (rng.normal(size=6) + 1j * rng.normal(size=6)).astype(np.complex64) * 4
    tx = adam_jax.clip_update_rms(0.5)
    clipped, _ = tx.update(jnp.asarray(u), tx.init(jnp.asarray(u)))
    assert clipped.dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(clipped), _clip_reference(u, 0.5), rtol=1e-6)
    assert math.isclose(
        float(np.sqrt(np.mean(np.abs(np.asarray(clipped)) ** 2))), 0.5, rel_tol=1e-6
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_clip_update_rms_keeps_the_dtype(dtype: Any) -> None:
    updates = {"w": jnp.full((8,), 10.0, dtype), "b": jnp.full((2,), 0.1, dtype)}
    tx = adam_jax.clip_update_rms(2.0)
    clipped, _ = tx.update(updates, tx.init(updates))
    assert clipped["w"].dtype == dtype and clipped["b"].dtype == dtype
    np.testing.assert_allclose(np.asarray(clipped["w"], np.float32), 2.0, rtol=1e-2)
    assert jnp.array_equal(clipped["b"], updates["b"])


def test_clip_update_rms_chains_after_an_optimizer() -> None:
    params = _tree()
    grads = jax.tree.map(lambda p: 100 * p, params)
    tx = optax.chain(adam_jax.scale_by_adam(), adam_jax.clip_update_rms(0.5), optax.scale(-0.1))
    updates, _ = tx.update(grads, tx.init(params), params)
    for leaf in jax.tree.leaves(updates):  # Adam's first normalized update has RMS ~1
        assert float(jnp.sqrt(jnp.mean(leaf**2))) <= 0.1 * 0.5 * (1 + 1e-6)


def test_clip_update_rms_is_per_packed_tensor_on_flat_params() -> None:
    updates = _tree()
    tx = adam_jax.clip_update_rms(1.0)
    on_tree, _ = tx.update(updates, tx.init(updates))
    packed = adam_jax.FlatParams.from_tree(updates)
    on_flat, _ = tx.update(packed, tx.init(packed))
    for a, b in zip(jax.tree.leaves(on_flat.to_tree()), jax.tree.leaves(on_tree), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_clip_update_rms_refuses_a_bad_max_rms(bad: float) -> None:
    with pytest.raises(ValueError, match="max_rms must be finite and > 0"):
        adam_jax.clip_update_rms(bad)


# -- skip_loss_spikes ------------------------------------------------------------------------


def _skip_reference(
    losses: list[float], window: int, threshold: float, min_history: int
) -> list[bool]:
    """Which steps are skipped: float64, with a plain list as the window."""
    kept: list[float] = []
    skipped = []
    for loss in losses:
        recent = np.asarray(kept[-window:], np.float64)
        if not math.isfinite(loss):
            skip = True
        elif len(kept) >= min_history:
            skip = loss > recent.mean() + threshold * recent.std()
        else:
            skip = False
        skipped.append(bool(skip))
        if not skip:
            kept.append(loss)
    return skipped


def _loss_sequence() -> list[float]:
    rng = np.random.default_rng(3)
    losses = list(3.0 - 0.01 * np.arange(60) + rng.normal(0, 0.02, 60))
    losses[5] = 10.0  # before the window fills: judged only with a short min_history
    losses[20] = 4.0
    losses[21] = 3.5
    losses[30] = math.nan
    losses[31] = math.inf
    losses[40] = 2.9  # a mild rise, within the band
    losses[45] = 50.0
    return [float(x) for x in losses]


@pytest.mark.parametrize(("window", "min_history"), [(8, None), (8, 4), (16, 2), (5, 5)])
def test_skip_loss_spikes_decides_as_the_reference(window: int, min_history: int | None) -> None:
    threshold = 4.0
    losses = _loss_sequence()
    expected = _skip_reference(losses, window, threshold, min_history or window)
    tx = adam_jax.skip_loss_spikes(
        optax.sgd(0.1), window=window, threshold=threshold, min_history=min_history
    )
    params = jnp.zeros(3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    got = []
    for loss in losses:
        before = int(state.skipped)
        updates, state = update(jnp.ones(3), state, params, value=jnp.float32(loss))
        got.append(int(state.skipped) == before + 1)
        assert jnp.array_equal(updates, jnp.zeros(3)) == got[-1]
    assert got == expected
    assert any(expected) and not all(expected)
    assert int(state.skipped) == sum(expected)
    assert int(state.accepted) == len(losses) - sum(expected)


def test_a_skipped_step_keeps_the_inner_state_bit_for_bit() -> None:
    params = _tree()
    tx = adam_jax.skip_loss_spikes(adam_jax.adamw(1e-2, weight_decay=0.1), window=4)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step, loss in enumerate([1.0, 1.01, 0.99, 1.0]):
        grads = jax.tree.map(lambda p, s=step: p * (s + 1), params)
        _, state = update(grads, state, params, value=loss)
    before = state
    updates, after = update(jax.tree.map(lambda p: -p, params), state, params, value=7.0)
    for leaf in jax.tree.leaves(updates):
        assert not jnp.any(leaf)
    for old, new in zip(
        jax.tree.leaves(before.inner_state), jax.tree.leaves(after.inner_state), strict=True
    ):
        assert old.dtype == new.dtype and jnp.array_equal(old, new)
    assert jnp.array_equal(after.losses, before.losses) and after.accepted == before.accepted
    assert after.skipped == before.skipped + 1
    # The next ordinary step is the step the inner optimizer would have taken without the spike.
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    ours, _ = update(grads, after, params, value=1.0)
    theirs, _ = jax.jit(adam_jax.adamw(1e-2, weight_decay=0.1).update)(
        grads, before.inner_state, params
    )
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_losses_are_skipped_from_the_first_step() -> None:
    tx = adam_jax.skip_loss_spikes(optax.sgd(1.0), window=4)
    params = jnp.ones(2)
    state = tx.init(params)
    for loss in [math.nan, math.inf, -math.inf]:
        updates, state = tx.update(jnp.ones(2), state, params, value=loss)
        assert not jnp.any(updates)
    assert int(state.skipped) == 3 and int(state.accepted) == 0
    # The window still fills with the finite losses only.
    updates, state = tx.update(jnp.ones(2), state, params, value=2.0)
    assert jnp.array_equal(updates, -jnp.ones(2)) and int(state.accepted) == 1
    assert float(state.losses[0]) == 2.0


def test_skip_loss_spikes_in_optax_chain_and_around_one() -> None:
    params = _tree()
    grads = jax.tree.map(lambda p: 3 * p, params)
    outer = optax.chain(
        optax.clip_by_global_norm(1.0),
        adam_jax.skip_loss_spikes(adam_jax.adam(1e-2), window=2, threshold=1.0),
    )
    inner = adam_jax.skip_loss_spikes(
        optax.chain(optax.clip_by_global_norm(1.0), adam_jax.adam(1e-2)), window=2, threshold=1.0
    )
    reference = optax.chain(optax.clip_by_global_norm(1.0), adam_jax.adam(1e-2))
    for tx in (outer, inner):
        state, ref_state = tx.init(params), reference.init(params)
        update = jax.jit(tx.update)
        for loss in [1.0, 1.2, 9.0, 1.1]:
            updates, state = update(grads, state, params, value=loss)
            if loss == 9.0:
                assert all(not jnp.any(leaf) for leaf in jax.tree.leaves(updates))
                continue
            expected, ref_state = jax.jit(reference.update)(grads, ref_state, params)
            for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_skip_loss_spikes_needs_the_loss() -> None:
    tx = adam_jax.skip_loss_spikes(optax.sgd(0.1))
    state = tx.init(jnp.zeros(2))
    with pytest.raises(ValueError, match=r"needs the step's loss.*value=loss"):
        tx.update(jnp.ones(2), state, jnp.zeros(2))
    with pytest.raises(ValueError, match="value must be a scalar loss"):
        tx.update(jnp.ones(2), state, jnp.zeros(2), value=jnp.ones(3))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"window": 1}, "window must be an integer >= 2"),
        ({"window": 0}, "window must be an integer >= 2"),
        ({"window": 8.0}, "window must be an integer >= 2"),
        ({"window": True}, "window must be an integer >= 2"),
        ({"threshold": 0.0}, "threshold must be finite and > 0"),
        ({"threshold": -1.0}, "threshold must be finite and > 0"),
        ({"threshold": math.inf}, "threshold must be finite and > 0"),
        (
            {"window": 8, "min_history": 1},
            r"min_history must be None or an integer in \[2, window\]",
        ),
        (
            {"window": 8, "min_history": 9},
            r"min_history must be None or an integer in \[2, window\]",
        ),
    ],
)
def test_skip_loss_spikes_refuses_bad_hyperparameters(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        adam_jax.skip_loss_spikes(optax.sgd(0.1), **options)


# -- cautious_weight_decay -------------------------------------------------------------------


def _cwd_reference(u: np.ndarray, p: np.ndarray, rate: float) -> np.ndarray:
    u64, p64 = np.asarray(u, np.float64), np.asarray(p, np.float64)
    return u64 + rate * p64 * (u64 * p64 >= 0)


def test_cautious_weight_decay_matches_the_float64_reference() -> None:
    params, updates = _tree(0), _tree(1)
    params["small"] = params["small"].at[0].set(0.0)  # zero params: decay by zero
    updates["large"] = updates["large"].at[:2].set(0.0)  # zero updates: decayed (u p >= 0)
    tx = adam_jax.cautious_weight_decay(0.3)
    state = tx.init(params)
    assert state == optax.EmptyState()
    decayed, _ = jax.jit(tx.update)(updates, state, params)
    for got, u, p in zip(
        jax.tree.leaves(decayed), jax.tree.leaves(updates), jax.tree.leaves(params), strict=True
    ):
        expected = _cwd_reference(np.asarray(u), np.asarray(p), 0.3)
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=1e-6, atol=1e-7)
    large_u, large_p = updates["large"], params["large"]
    np.testing.assert_allclose(decayed["large"][:2], 0.3 * large_p[:2], rtol=1e-6)
    agree = np.asarray(large_u * large_p) > 0
    disagree = np.asarray(large_u * large_p) < 0
    assert agree.any() and disagree.any()
    assert np.array_equal(np.asarray(decayed["large"])[disagree], np.asarray(large_u)[disagree])


def test_cautious_weight_decay_complex_and_low_precision() -> None:
    p = jnp.array([1 + 1j, 1 - 1j, -2j], jnp.complex64)
    u = jnp.array([1 + 0j, -1 + 0j, 0 - 1j], jnp.complex64)  # Re(u conj(p)) = 1, -1, 2
    tx = adam_jax.cautious_weight_decay(0.5)
    decayed, _ = tx.update(u, tx.init(p), p)
    np.testing.assert_allclose(np.asarray(decayed), [1.5 + 0.5j, -1 + 0j, 0 - 2j], rtol=1e-6)
    pb = jnp.array([1.0, -1.0], jnp.bfloat16)
    ub = jnp.array([0.5, 0.5], jnp.bfloat16)
    decayed_b, _ = tx.update(ub, tx.init(pb), pb)
    assert decayed_b.dtype == jnp.bfloat16
    assert decayed_b.tolist() == [1.0, 0.5]


def test_cautious_weight_decay_mask_and_schedule() -> None:
    params = {"w": jnp.array([1.0, -1.0]), "b": jnp.array([2.0])}
    updates = {"w": jnp.array([1.0, 1.0]), "b": jnp.array([1.0])}
    masked = adam_jax.cautious_weight_decay(0.1, mask={"w": True, "b": False})
    decayed, _ = masked.update(updates, masked.init(params), params)
    np.testing.assert_allclose(decayed["w"], [1.1, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(decayed["b"], [1.0])

    scheduled = adam_jax.cautious_weight_decay(lambda count: 0.1 * (count + 1))
    state = scheduled.init(params)
    first, state = scheduled.update(updates, state, params)
    second, state = jax.jit(scheduled.update)(updates, state, params)
    np.testing.assert_allclose(first["w"], [1.1, 1.0], rtol=1e-6)
    np.testing.assert_allclose(second["w"], [1.2, 1.0], rtol=1e-6)
    np.testing.assert_allclose(second["b"], [1.4], rtol=1e-6)
    assert int(state.count) == 2


def test_cautious_weight_decay_in_an_adam_chain() -> None:
    """Where ``add_decayed_weights`` goes: the step is -lr (u + wd p [u p >= 0])."""
    params, grads = _tree(0), _tree(2)
    moments = adam_jax.scale_by_adam()
    tx = optax.chain(
        adam_jax.scale_by_adam(),
        adam_jax.cautious_weight_decay(0.2),
        adam_jax.scale_by_learning_rate(0.01),
    )
    updates, _ = tx.update(grads, tx.init(params), params)
    directions, _ = moments.update(grads, moments.init(params), params)
    for got, u, p in zip(
        jax.tree.leaves(updates), jax.tree.leaves(directions), jax.tree.leaves(params), strict=True
    ):
        expected = -0.01 * _cwd_reference(np.asarray(u), np.asarray(p), 0.2)
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=1e-5, atol=1e-9)


def test_cautious_weight_decay_needs_params_and_a_good_rate() -> None:
    tx = adam_jax.cautious_weight_decay(0.1)
    with pytest.raises(ValueError, match="cautious_weight_decay needs params"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="weight_decay must be finite and >= 0"):
            adam_jax.cautious_weight_decay(bad)
