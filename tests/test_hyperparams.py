"""Hyperparameters stated once (``adam_jax.rules.hyperparam``): the signatures, checks and Args
that ``rules.transformation`` and ``rules.optimizer`` write from a rule's fields."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax
from adam_jax import registry, rules


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaledSignRule(rules.AdamLikeRule):
    """The sign of Adam's first moment times ``scale``."""

    b1: Any = rules.b1()
    b2: Any = rules.b2(0.99)
    scale: Any = rules.hyperparam(2.0, "the step's length, > 0.", rules.at_least(0.5))
    form: str = rules.hyperparam("sign", "``'sign'`` or ``'raw'``.", rules.choice("sign", "raw"))
    mu_dtype: Any = rules.mu_dtype()
    nu_dtype: Any = rules.nu_dtype()

    def update(self, g, moments, scalars, leaf):
        mu = rules.moving_average(moments["mu"], g, scalars.w1)
        nu = rules.moving_average(moments["nu"], rules.abs_sq(g), scalars.w2)
        direction = jnp.sign(mu) if self.form == "sign" else mu
        return leaf.add_decay(self.scale * direction), {"mu": mu, "nu": nu}


@rules.transformation(ScaledSignRule, positional=("b1", "b2"), decay=True)
def scale_by_scaled_sign() -> None:
    """The scaled sign of the first moment.

    Returns:
      A transformation.
    """


@rules.optimizer(scale_by_scaled_sign, defaults={"scale": 1.0})
def scaled_sign() -> None:
    """Scaled-sign descent."""


def _parameters(fn) -> list[tuple[str, str, Any]]:
    return [(p.name, p.kind.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_signatures_list_the_fields_with_their_defaults() -> None:
    expected = [
        ("b1", "POSITIONAL_OR_KEYWORD", 0.9),
        ("b2", "POSITIONAL_OR_KEYWORD", 0.99),
        ("scale", "KEYWORD_ONLY", 2.0),
        ("form", "KEYWORD_ONLY", "sign"),
        ("mu_dtype", "KEYWORD_ONLY", None),
        ("nu_dtype", "KEYWORD_ONLY", None),
        ("weight_decay", "KEYWORD_ONLY", 0.0),
        ("mask", "KEYWORD_ONLY", None),
    ]
    assert _parameters(scale_by_scaled_sign) == expected
    alias = _parameters(scaled_sign)
    assert alias[0][:2] == ("learning_rate", "POSITIONAL_OR_KEYWORD")
    assert alias[-1] == ("maximize", "KEYWORD_ONLY", False)
    assert alias[1:-1] == [(*p[:2], 1.0) if p[0] == "scale" else p for p in expected]


def test_args_are_written_from_the_fields_before_returns() -> None:
    doc = scale_by_scaled_sign.__doc__
    args, returns = doc.index("Args:"), doc.index("Returns:")
    assert args < returns
    for line in ("  b1: decay of the first moment, in [0, 1).", "  scale: the step's length, > 0."):
        assert line in doc[args:returns]
    assert "  learning_rate: a constant >= 0" in scaled_sign.__doc__
    assert "  maximize: ascend the objective" in scaled_sign.__doc__


def test_the_transformation_is_the_rule_and_the_alias_its_descent() -> None:
    params, grads = jnp.array([1.0, -2.0]), jnp.array([0.5, -3.0])
    tx = scale_by_scaled_sign(0.5, scale=3.0, weight_decay=0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates, 3.0 * np.sign(grads) + 0.1 * params, rtol=1e-6)
    alias = scaled_sign(0.1, maximize=True)
    updates, _ = alias.update(grads, alias.init(params))
    np.testing.assert_allclose(updates, 0.1 * np.sign(grads), rtol=1e-6)  # scale 1, ascending


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"b1": 1.5}, r"b1 must be in \[0, 1\)"),
        ({"scale": 0.1}, "scale must be finite and >= 0.5, got 0.1"),
        ({"form": "cube"}, r"form must be one of \('sign', 'raw'\), got 'cube'"),
        ({"weight_decay": -1.0}, "weight_decay must be finite and >= 0"),
    ],
)
def test_bad_values_are_refused_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scale_by_scaled_sign(**kwargs)
    with pytest.raises(ValueError, match=message):
        scaled_sign(0.1, **kwargs)


def test_unknown_and_extra_positional_arguments_are_type_errors() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'b3'"):
        scale_by_scaled_sign(b3=0.5)
    with pytest.raises(TypeError, match="too many positional arguments"):
        scale_by_scaled_sign(0.9, 0.99, 2.0)


def test_traced_and_scheduled_values_pass_the_checks() -> None:
    tx = optax.inject_hyperparams(scaled_sign)(learning_rate=0.1, b1=0.5, scale=2.0)
    state = tx.init(jnp.zeros(3))
    updates, _ = tx.update(jnp.ones(3), state)
    np.testing.assert_allclose(updates, -0.2 * np.ones(3), rtol=1e-6)


def test_misdeclared_stubs_and_names_fail_at_import() -> None:
    with pytest.raises(TypeError, match="must take no parameters"):

        @rules.transformation(ScaledSignRule)
        def takes_one(b1) -> None: ...

    with pytest.raises(TypeError, match="not hyperparameters of the rule"):
        rules.transformation(ScaledSignRule, positional=("b3",))
    with pytest.raises(TypeError, match="not hyperparameters of the rule"):
        rules.optimizer(scale_by_scaled_sign, defaults={"b3": 0.1})


def test_a_rate_field_puts_the_learning_rate_inside_the_rule() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class StepRule(rules.AdamLikeRule):
        learning_rate: Any = rules.learning_rate()
        b1: Any = rules.b1()
        b2: Any = rules.b2()
        mu_dtype: Any = None
        nu_dtype: Any = None

        def scalars(self, fields, dtype):
            return self.rate(fields, dtype)

        def update(self, g, moments, rate, leaf):
            return -rate * g, moments

    @rules.transformation(StepRule)
    def scale_by_step() -> None:
        """Steps inside."""

    @rules.optimizer(scale_by_step)
    def step() -> None:
        """Steps inside."""

    assert "learning_rate" not in inspect.signature(scale_by_step).parameters
    tx = step(lambda count: 0.5 * (count + 1))  # a schedule of the 0-based step
    state = tx.init(jnp.zeros(2))
    for expected in (0.5, 1.0):
        updates, state = tx.update(jnp.ones(2), state)
        np.testing.assert_allclose(updates, -expected * np.ones(2))
    np.testing.assert_allclose(scale_by_step().update(jnp.ones(2), state[-1])[0], -np.ones(2))
    with pytest.raises(ValueError, match="learning_rate must be finite and >= 0"):
        step(-1.0)


@pytest.mark.parametrize(
    "info", [i for i in registry.OPTIMIZERS if i.rule is not None], ids=lambda i: i.name
)
def test_library_rules_are_built_by_keyword_only(info: registry.OptimizerInfo) -> None:
    assert info.rule is not None
    init = inspect.signature(info.rule.__init__).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in init if p.name != "self")


def test_registry_rows_and_leaves_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        registry.Paper("a", "b", "c", "d")  # type: ignore[misc]
    with pytest.raises(TypeError):
        adam_jax.Leaf(None, 0.0)  # type: ignore[misc]
    leaf = adam_jax.Leaf(param=None, decay=0.0, segments=(2, 3))
    np.testing.assert_allclose(leaf.sum(jnp.arange(5.0)), [1, 1, 9, 9, 9])
