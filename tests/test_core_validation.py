"""Bad hyperparameters fail at construction with a message naming the argument and the value.

Concrete values are checked when the transformation is built (ValueError naming the argument,
the value received and the accepted range); a mask whose tree does not match the params fails
at init; traced values (jit / vmap over hyperparameters) and schedules are not checked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
import pytest

import adam_jax

NAN, INF = math.nan, math.inf

# name -> factory taking keyword overrides
FACTORIES: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": lambda **kw: adam_jax.adam(**{"learning_rate": 1e-3, **kw}),
    "adamw": lambda **kw: adam_jax.adamw(**{"learning_rate": 1e-3, **kw}),
    "nadam": lambda **kw: adam_jax.nadam(**{"learning_rate": 1e-3, **kw}),
    "nadamw": lambda **kw: adam_jax.nadamw(**{"learning_rate": 1e-3, **kw}),
    "adam_l2": lambda **kw: adam_jax.adam_l2(**{"learning_rate": 1e-3, **kw}),
    "amsgrad": lambda **kw: adam_jax.amsgrad(**{"learning_rate": 1e-3, **kw}),
    "adamax": lambda **kw: adam_jax.adamax(**{"learning_rate": 1e-3, **kw}),
    "adamaxw": lambda **kw: adam_jax.adamaxw(**{"learning_rate": 1e-3, **kw}),
    "scale_by_adam": lambda **kw: adam_jax.scale_by_adam(**kw),
    "scale_by_amsgrad": lambda **kw: adam_jax.scale_by_amsgrad(**kw),
    "scale_by_adamax": lambda **kw: adam_jax.scale_by_adamax(**kw),
}
WITH_LR = ["adam", "adamw", "nadam", "nadamw", "adam_l2", "amsgrad", "adamax", "adamaxw"]
WITH_WD = ["adamw", "nadamw", "adam_l2", "adamaxw"]
WITH_EPS_ROOT = ["adam", "adamw", "nadam", "adam_l2", "amsgrad", "scale_by_adam"]


def _assert_message(exc: pytest.ExceptionInfo, name: str, value: float, range_text: str) -> None:
    message = str(exc.value)
    assert re.search(rf"\b{name}\b", message), message
    assert repr(value) in message or str(value) in message, message
    assert range_text in message, message


@pytest.mark.parametrize("factory", WITH_LR)
@pytest.mark.parametrize("value", [-1e-3, NAN, INF, -INF])
def test_bad_learning_rate(factory: str, value: float) -> None:
    """Negative or non-finite learning rates raise ValueError naming learning_rate."""
    with pytest.raises(ValueError) as exc:
        FACTORIES[factory](learning_rate=value)
    _assert_message(exc, "learning_rate", value, ">= 0")


@pytest.mark.parametrize("factory", WITH_WD)
@pytest.mark.parametrize("value", [-1e-4, NAN, INF])
def test_bad_weight_decay(factory: str, value: float) -> None:
    """Negative or non-finite weight decay raises ValueError naming weight_decay."""
    with pytest.raises(ValueError) as exc:
        FACTORIES[factory](weight_decay=value)
    _assert_message(exc, "weight_decay", value, ">= 0")


@pytest.mark.parametrize("value", [-0.5, NAN])
def test_bad_weight_decay_building_blocks(value: float) -> None:
    """add_decayed_weights and scale_by_learning_rate check their scalar too."""
    with pytest.raises(ValueError) as exc:
        adam_jax.add_decayed_weights(value)
    _assert_message(exc, "weight_decay", value, ">= 0")
    with pytest.raises(ValueError) as exc:
        adam_jax.scale_by_learning_rate(value)
    _assert_message(exc, "learning_rate", value, ">= 0")


@pytest.mark.parametrize("factory", sorted(FACTORIES))
@pytest.mark.parametrize("arg", ["b1", "b2"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, NAN])
def test_bad_decay_rates(factory: str, arg: str, value: float) -> None:
    """b1, b2 outside [0, 1) (including exactly 1 and NaN) raise ValueError."""
    with pytest.raises(ValueError) as exc:
        FACTORIES[factory](**{arg: value})
    _assert_message(exc, arg, value, "[0, 1)")


@pytest.mark.parametrize("arg", ["b1", "b2"])
def test_bad_decay_rates_bias_correction(arg: str) -> None:
    """scale_by_bias_correction checks b1, b2 as well."""
    with pytest.raises(ValueError) as exc:
        adam_jax.scale_by_bias_correction(**{arg: 1.0})
    _assert_message(exc, arg, 1.0, "[0, 1)")


@pytest.mark.parametrize("factory", sorted(FACTORIES))
@pytest.mark.parametrize("value", [-1e-8, INF, NAN])
def test_bad_eps(factory: str, value: float) -> None:
    """Negative or non-finite eps raises ValueError naming eps."""
    with pytest.raises(ValueError) as exc:
        FACTORIES[factory](eps=value)
    _assert_message(exc, "eps", value, ">= 0")


@pytest.mark.parametrize("factory", WITH_EPS_ROOT)
@pytest.mark.parametrize("value", [-1e-8, INF])
def test_bad_eps_root(factory: str, value: float) -> None:
    """Negative or non-finite eps_root raises ValueError naming eps_root."""
    with pytest.raises(ValueError) as exc:
        FACTORIES[factory](eps_root=value)
    _assert_message(exc, "eps_root", value, ">= 0")


@pytest.mark.parametrize("factory", sorted(FACTORIES))
def test_boundary_values_are_accepted(factory: str) -> None:
    """b1 = b2 = 0, eps = 0, learning rate 0 and weight decay 0 are valid."""
    kwargs = {"b1": 0.0, "b2": 0.0, "eps": 0.0}
    if factory in WITH_LR:
        kwargs["learning_rate"] = 0.0
    if factory in WITH_WD:
        kwargs["weight_decay"] = 0.0
    opt = FACTORIES[factory](**kwargs)
    params = {"w": jnp.ones((3,))}
    opt.update({"w": jnp.ones((3,))}, opt.init(params), params)


@pytest.mark.parametrize("factory", ["adamw", "adam_l2", "adamaxw"])
def test_mask_tree_mismatch_fails_at_init(factory: str) -> None:
    """A mask whose structure differs from the params raises ValueError at init."""
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    opt = FACTORIES[factory](weight_decay=1e-2, mask={"w": True})
    with pytest.raises(ValueError):
        opt.init(params)
    opt = FACTORIES[factory](weight_decay=1e-2, mask=lambda p: {"w": True, "c": False})
    with pytest.raises(ValueError):
        opt.init(params)


def test_traced_hyperparameters_are_not_checked() -> None:
    """Under jit, out-of-range traced values pass through (no concrete value to check)."""
    params = {"w": jnp.ones((3,))}
    grads = {"w": jnp.full((3,), 0.5)}

    @jax.jit
    def step(lr, b1, b2, eps, wd):
        opt = adam_jax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
        return opt.update(grads, opt.init(params), params)[0]

    updates = step(-1e-3, 0.9, 0.999, 1e-8, -1e-2)  # a negative lr is not checked when traced
    assert bool(jnp.all(updates["w"] > 0))
    batched = jax.vmap(lambda b1: step(1e-3, b1, 0.999, 1e-8, 0.0))(jnp.asarray([0.0, 0.5]))
    assert batched["w"].shape == (2, 3)


def test_schedules_are_not_checked() -> None:
    """A schedule is accepted as learning_rate / weight_decay without being evaluated."""
    calls = []

    def schedule(count):
        calls.append(count)
        return 1e-3 * jnp.ones_like(count, dtype=jnp.float32)

    adam_jax.adamw(schedule, weight_decay=schedule)
    assert not calls


def test_bad_eps_placement() -> None:
    """An unknown eps_placement raises ValueError naming the argument and the value."""
    with pytest.raises(ValueError) as exc:
        adam_jax.adam(1e-3, eps_placement="tensorflow")
    message = str(exc.value)
    assert "eps_placement" in message and "tensorflow" in message, message
