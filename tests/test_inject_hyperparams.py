"""``optax.inject_hyperparams`` on every optimizer of the registry, without ``static_args``.

``inject_hyperparams`` takes every callable argument for a schedule of the step and injects
every number as an array in its state, so no alias may default an argument to a function
(ADOPT's ``clip_value_fn``, Adam-mini's ``mask``) or to a number that fixes shapes (the 8-bit
``block_size`` and ``min_size``). For each row: the injected optimizer gives the plain alias's
params (bit for bit when only the learning rate is injected), and a new learning rate in
``state.hyperparams`` takes effect.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest
from variants import BY_NAME

from adam_jax import registry

ROWS = registry.OPTIMIZERS
NAME = operator.attrgetter("name")
STEPS = 3


def _params() -> dict[str, Any]:
    # A kernel of 4096 elements (the 8-bit aliases quantize it), a bias (Adam-mini's default
    # mask spares it from decay) and a small matrix. The kernel's diagonal makes its gradients
    # full rank: SOAP's eigenbasis of a smooth kernel's (numerically rank 2) would be float32
    # noise, turned by any rounding of the injected scalars (5e-7 in the params).
    return {
        "dense": {
            "kernel": jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64)
            + jnp.diag(jnp.linspace(0.2, 0.6, 64)),
            "bias": jnp.linspace(0.5, -0.5, 64),
        },
        "w": jnp.array([[0.3, -0.7, 1.2], [0.05, -0.4, 0.9]]),
    }


def _grads(params: Any, step: int) -> Any:
    return jax.tree.map(lambda p: jnp.sin((step + 1.0) * p) + 0.1 * p - 0.05, params)


def _run(tx: optax.GradientTransformation, steps: int = STEPS) -> tuple[Any, Any, Any]:
    update = jax.jit(tx.update)
    params = _params()
    state = tx.init(params)
    for step in range(steps):
        updates, state = update(_grads(params, step), state, params)
        params = optax.apply_updates(params, updates)
    return params, state, update


def _assert_equal(actual: Any, expected: Any) -> None:
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype
        assert jnp.array_equal(a, e), jnp.max(jnp.abs(a - e))


def _takes(info: registry.OptimizerInfo, name: str) -> bool:
    return name in inspect.signature(info.alias).parameters


def _assert_close(actual: Any, expected: Any) -> None:
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype
        # A few float32 ulps of the params (which are of order 1).
        assert jnp.allclose(a, e, rtol=1e-6, atol=3e-7), jnp.max(jnp.abs(a - e))


def _numbers_besides_the_rate(tx: optax.GradientTransformation) -> tuple[str, ...]:
    hyperparams = tx.init(_params()).hyperparams  # type: ignore[attr-defined]
    return tuple(name for name in hyperparams if name != "learning_rate")


@pytest.mark.parametrize("info", ROWS, ids=NAME)
def test_injected_alias_gives_the_plain_alias_params(info: registry.OptimizerInfo) -> None:
    """Without ``static_args``, every number is injected (b1, b2, eps...) and the params agree
    to a few ulps: XLA folds ``1 - b2`` and ``b2 ** t`` of constants in other ways than of
    arrays. With the learning rate alone injected, they agree bit for bit."""
    injected = optax.inject_hyperparams(info.alias)(learning_rate=1e-2, **info.example_options)
    plain = registry.create(info.name, 1e-2)
    theirs, _, _ = _run(plain)
    ours, state, _ = _run(injected)
    _assert_close(ours, theirs)
    assert state.hyperparams["learning_rate"] == jnp.float32(1e-2)

    only_the_rate = optax.inject_hyperparams(
        info.alias, static_args=_numbers_besides_the_rate(injected)
    )(learning_rate=1e-2, **info.example_options)
    ours, state, _ = _run(only_the_rate)
    _assert_equal(ours, theirs)
    assert list(state.hyperparams) == ["learning_rate"]


@pytest.mark.parametrize("info", [i for i in ROWS if _takes(i, "weight_decay")], ids=NAME)
def test_injected_weight_decay_and_default_mask_give_the_plain_alias_params(
    info: registry.OptimizerInfo,
) -> None:
    """A weight decay that is not zero, with each alias's default mask (Adam-mini's spares
    the bias: its mask, called as a schedule of the step, would decay it)."""
    options = {**info.example_options, "weight_decay": 0.25}
    injected = optax.inject_hyperparams(info.alias)(learning_rate=1e-2, **options)
    plain = registry.create(info.name, 1e-2, weight_decay=0.25)
    ours, state, _ = _run(injected)
    theirs, _, _ = _run(plain)
    _assert_close(ours, theirs)
    assert state.hyperparams["weight_decay"] == jnp.float32(0.25)


def _set_learning_rate(state: Any, value: float) -> Any:
    hyperparams = dict(state.hyperparams)
    # The stored dtype: a new value, not a new trace.
    hyperparams["learning_rate"] = jnp.asarray(value, hyperparams["learning_rate"].dtype)
    return state._replace(hyperparams=hyperparams)


@pytest.mark.parametrize("info", ROWS, ids=NAME)
def test_a_new_learning_rate_in_the_state_takes_effect(info: registry.OptimizerInfo) -> None:
    injected = optax.inject_hyperparams(info.alias)(learning_rate=1e-2, **info.example_options)
    params, state, update = _run(injected)
    grads = _grads(params, STEPS)

    at_zero, _ = update(grads, _set_learning_rate(state, 0.0), params)
    at_base, _ = update(grads, state, params)
    at_double, _ = update(grads, _set_learning_rate(state, 2e-2), params)
    if info.schedule_free:
        # The params are y = (1 - b1) z + b1 x: a zero rate leaves z where it is, but the
        # average x still moves towards z, by a weight that the rate does not scale. The rate
        # still takes effect: the step differs from the base rate's.
        assert any(
            not jnp.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(at_zero), jax.tree.leaves(at_base), strict=True)
        )
        return
    for zero, base, double in zip(
        jax.tree.leaves(at_zero), jax.tree.leaves(at_base), jax.tree.leaves(at_double),
        strict=True,
    ):  # fmt: skip
        assert not jnp.any(zero), "a zero learning rate must leave the params unchanged"
        assert jnp.any(base)
        # A rule that weighs each direction of its momentum by the rate it was taken with
        # (LaProp, as its authors' code): twice the rate at one step is not twice that step.
        if info.name in BY_NAME and not BY_NAME[info.name].step_proportional_to_rate:
            assert not jnp.array_equal(double, base)
            continue
        # The rate is the last factor of every update: twice the rate is exactly twice the
        # update (a power of two).
        assert jnp.array_equal(double, 2 * base)


def test_the_defaults_that_stand_for_functions_and_sizes_are_the_documented_ones() -> None:
    """``clip_value_fn=None`` is t^(1/4), ``mask="by_name"`` the authors' mask, and the 8-bit
    sizes ``None`` are 256 and 4096; any other string mask is refused."""
    import adam_jax
    from adam_jax import quantization

    pairs = [
        (adam_jax.adopt(1e-2), adam_jax.adopt(1e-2, clip_value_fn=lambda t: t**0.25)),
        (
            adam_jax.adam_8bit(1e-2),
            adam_jax.adam(1e-2, **quantization.eight_bit_moments(256, 4096)),
        ),
    ]
    for default, explicit in pairs:
        _assert_equal(_run(default)[0], _run(explicit)[0])
    decayed = _run(adam_jax.adam_mini(1e-2, weight_decay=0.25))[0]
    named = _run(adam_jax.adam_mini(1e-2, weight_decay=0.25, mask="by_name"))[0]
    everything = _run(adam_jax.adam_mini(1e-2, weight_decay=0.25, mask=None))[0]
    _assert_equal(decayed, named)
    assert not jnp.array_equal(decayed["dense"]["bias"], everything["dense"]["bias"])
    assert jnp.array_equal(decayed["dense"]["kernel"], everything["dense"]["kernel"])
    with pytest.raises(ValueError, match="mask must be one of"):
        adam_jax.adam_mini(1e-2, mask="by_names")
