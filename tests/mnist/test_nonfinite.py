"""Library behaviour behind ``--skip-nonfinite``: adam_jax's optimizers under
``optax.apply_if_finite`` skip a step with a NaN or Inf gradient as if it never happened."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax

STEPS = 1000
BAD_FRACTION = 0.05
# 4096 elements: the smallest leaf that eight_bit_moments() quantizes (its min_size).
SIZES = {"w": 4096, "b": 3}

OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam": lambda: adam_jax.adam(1e-2),
    "adamw": lambda: adam_jax.adamw(1e-2, weight_decay=0.1),
    "amsgrad": lambda: adam_jax.amsgrad(1e-2),
    "adamw_8bit": lambda: adam_jax.adamw(1e-2, weight_decay=0.1, **adam_jax.eight_bit_moments()),
}
# Injected values: a NaN, an Inf or a -Inf in one element of one leaf.
POISONS = (float("nan"), float("inf"), -float("inf"))


def _targets() -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(1), len(SIZES))
    return {
        name: jax.random.normal(k, (n,)) for k, (name, n) in zip(keys, SIZES.items(), strict=True)
    }


def _make_run(tx: optax.GradientTransformation) -> Callable[..., tuple[dict, optax.OptState]]:
    """A function that runs the steps of a schedule of ``(step number, poison, position)``
    from zero params, one compiled step at a time."""
    targets = _targets()

    @jax.jit
    def step(params, state, t, poison, position):
        """One update on a noisy quadratic's gradient at step ``t``; ``poison`` (if not 0)
        replaces the element ``position`` of ``w``'s gradient."""
        keys = jax.random.split(jax.random.fold_in(jax.random.key(2), t), len(SIZES))
        grads = {
            name: params[name] - targets[name] + 0.5 * jax.random.normal(k, params[name].shape)
            for k, name in zip(keys, SIZES, strict=True)
        }
        w = grads["w"]
        grads["w"] = jnp.where(poison == 0, w, w.at[position].set(poison))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def run(schedule: list[tuple[int, float, int]]) -> tuple[dict, optax.OptState]:
        params = {name: jnp.zeros(n) for name, n in SIZES.items()}
        state = tx.init(params)
        for t, poison, position in schedule:
            params, state = step(params, state, t, poison, position)
        return params, state

    return run


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_skipped_steps_are_as_if_left_out(name: str) -> None:
    """1000 steps, 5% of them with a NaN, Inf or -Inf gradient element: the params and the
    moments end exactly as in the same run with those steps left out."""
    rng = np.random.default_rng(0)
    bad = sorted(rng.choice(STEPS, int(BAD_FRACTION * STEPS), replace=False).tolist())
    poisons = {t: (POISONS[i % 3], int(rng.integers(SIZES["w"]))) for i, t in enumerate(bad)}
    with_bad = [(t, *poisons.get(t, (0.0, 0))) for t in range(STEPS)]
    left_out = [(t, 0.0, 0) for t in range(STEPS) if t not in poisons]

    skipping = _make_run(optax.apply_if_finite(OPTIMIZERS[name](), max_consecutive_errors=10))
    params, state = skipping(with_bad)
    expected, expected_state = skipping(left_out)

    assert int(state.total_notfinite) == len(bad)
    for leaf in jax.tree.leaves((params, state)):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            assert np.all(np.isfinite(leaf))
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    jax.tree.map(np.testing.assert_array_equal, state.inner_state, expected_state.inner_state)
    if name.endswith("8bit"):
        return  # Against the bare optimizer, a rounding difference can flip an 8-bit code.
    # The bare optimizer, never shown the bad steps, agrees within float32 rounding (its
    # update compiles outside apply_if_finite's lax.cond, so XLA may fuse it differently).
    bare_params, _ = _make_run(OPTIMIZERS[name]())(left_out)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, bare_params
    )
