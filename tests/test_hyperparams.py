"""Hyperparameters stated once (``adam_jax.rules.hyperparam``): the checks a rule's fields run,
and, for every optimizer of the registry, its written-out signature and Args against the rule's
fields."""

from __future__ import annotations

import dataclasses
import functools
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


def scale_by_scaled_sign(
    b1: float = 0.9,
    b2: float = 0.99,
    *,
    scale: float = 2.0,
    form: str = "sign",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
) -> optax.GradientTransformation:
    """The scaled sign of the first moment, written as the library writes its own.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      scale: the step's length, > 0.
      form: ``'sign'`` or ``'raw'``.
      mu_dtype: storage of the first moment.
      nu_dtype: storage of the second moment.
      weight_decay: decoupled weight decay.
      mask: which leaves to decay.

    Returns:
      A transformation.
    """
    rule = ScaledSignRule(
        b1=b1, b2=b2, scale=scale, form=form, mu_dtype=mu_dtype, nu_dtype=nu_dtype
    )
    return rules.scale_by_rule(rule, weight_decay=weight_decay, mask=mask)


def scaled_sign(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    *,
    scale: float = 1.0,
    form: str = "sign",
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    """Scaled-sign descent."""
    moments = scale_by_scaled_sign(
        b1, b2, scale=scale, form=form, weight_decay=weight_decay, mask=mask
    )
    return rules.descend(learning_rate, moments, maximize=maximize)


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


def test_traced_and_scheduled_values_pass_the_checks() -> None:
    tx = optax.inject_hyperparams(scaled_sign)(learning_rate=0.1, b1=0.5, scale=2.0)
    state = tx.init(jnp.zeros(3))
    updates, _ = tx.update(jnp.ones(3), state)
    np.testing.assert_allclose(updates, -0.2 * np.ones(3), rtol=1e-6)


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

    def scale_by_step(b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
        return rules.scale_by_rule(StepRule(b1=b1, b2=b2))

    def step(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
        return optax.chain(rules.scale_by_rule(StepRule(learning_rate=learning_rate)))

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
        adam_jax.rules.Leaf(None, 0.0)  # type: ignore[misc]
    leaf = adam_jax.rules.Leaf(param=None, decay=0.0, segments=(2, 3))
    np.testing.assert_allclose(leaf.sum(jnp.arange(5.0)), [1, 1, 9, 9, 9])


# The signatures are written out in the source (as optax writes its aliases); these tests hold
# them to the rules' fields. Besides the fields, an optimizer takes the learning rate, the decay
# and ``maximize``; the exceptions below are optax's signatures, which the Adam aliases keep.
EXTRAS = {"learning_rate", "weight_decay", "mask", "maximize"}
# Fields of the rule that a signature leaves out (at the field's default, or fixed by the name).
LEFT_OUT: dict[str, set[str]] = {
    "adam": {"bias_correction"},
    "adamw": {"bias_correction"},
    "nadam": {"bias_correction"},
    "nadamw": {"bias_correction"},
    "adam_l2": {"bias_correction", "nesterov"},
    "amsgrad": {"bias_correction", "nesterov"},
    "scale_by_amsgrad": {"nesterov"},
    "adamax": {"mu_dtype"},
    "adamaxw": {"mu_dtype"},
    "adam_8bit": {"bias_correction", "mu_dtype", "nu_dtype"},
    "adamw_8bit": {"bias_correction", "mu_dtype", "nu_dtype"},
}
# Parameters that are not fields of the rule (nor EXTRAS).
ADDED: dict[str, set[str]] = {
    "adam": {"eps_placement"},
    "adamw": {"eps_placement"},
    "nadam": {"eps_placement"},
    "nadamw": {"eps_placement"},
    "adam_l2": {"amsgrad"},
    "adam_8bit": {"eps_placement", "block_size", "min_size"},
    "adamw_8bit": {"eps_placement", "block_size", "min_size"},
    "soap": {"stack_blocks"},
    "scale_by_soap": {"stack_blocks"},
}
# Defaults that differ from the field's, each documented in the function's docstring.
OVERRIDES: dict[tuple[str, str], Any] = {
    ("ademamix", "alpha"): 5.0,  # the authors' optimizer; their transformation's is 6
    ("nadam", "nesterov"): True,
    ("nadamw", "nesterov"): True,
}


def _spec(field: dataclasses.Field) -> rules.Hyperparam:
    return next(v for v in field.metadata.values() if isinstance(v, rules.Hyperparam))


def _name(fn: Any) -> str:
    return fn.func.__name__ if isinstance(fn, functools.partial) else fn.__name__


def _functions() -> list[tuple[str, Any, type | None]]:
    """Each registry optimizer and transformation once: (its public name, it, its rule)."""
    seen: dict[str, tuple[str, Any, type | None]] = {}
    for info in registry.OPTIMIZERS:
        seen.setdefault(info.name, (info.name, info.alias, info.rule))
        if info.transformation is not None:
            name = info.transformation.__name__
            seen.setdefault(name, (name, info.transformation, info.rule))
    return list(seen.values())


FUNCTIONS = _functions()


def _args(fn: Any) -> dict[str, str]:
    """The Args section of ``fn``'s docstring (a partial's: its function's), as
    ``{name: text}``; a line naming several (``b1, b2: as in adam``) gives each the text."""
    doc = inspect.getdoc(fn.func if isinstance(fn, functools.partial) else fn) or ""
    lines = doc.splitlines()
    assert "Args:" in lines, f"{_name(fn)} has no Args section"
    args: dict[str, str] = {}
    names: list[str] = []
    for line in lines[lines.index("Args:") + 1 :]:
        if not line.startswith("  "):
            break
        if not line.startswith("    "):
            head, _, text = line.strip().partition(": ")
            names = [n.strip() for n in head.split(",")]
            args.update(dict.fromkeys(names, text))
        else:
            args.update({n: f"{args[n]} {line.strip()}" for n in names})
    return args


@pytest.mark.parametrize(("name", "fn", "rule"), FUNCTIONS, ids=[f[0] for f in FUNCTIONS])
def test_signatures_are_the_rules_fields(name: str, fn: Any, rule: type | None) -> None:
    params = inspect.signature(fn).parameters
    if rule is None:  # a chain of others (cautious_adamw, lamb, adam_mini): Args alone
        return
    fields = {f.name: f for f in rules.fields_of(rule)}
    transformation = name.startswith("scale_by_")
    expected = {
        n
        for n, f in fields.items()
        if not (transformation and (n == "learning_rate" or _spec(f).optimizer_only))
    }
    assert expected - set(params) == LEFT_OUT.get(name, set()), "fields missing"
    assert set(params) - set(fields) - EXTRAS == ADDED.get(name, set()), "unknown parameters"
    for n, p in params.items():
        if n in fields:
            default = OVERRIDES.get((name, n), fields[n].default)
            if n == "learning_rate" and default is None:
                default = inspect.Parameter.empty  # the optimizer's rate is required
            assert p.default == default, f"{n}: {p.default!r} against the field's {default!r}"
    if not transformation:
        assert next(iter(params)) == "learning_rate"
        assert params["maximize"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize(("name", "fn", "rule"), FUNCTIONS, ids=[f[0] for f in FUNCTIONS])
def test_signatures_are_typed_and_each_parameter_documented(
    name: str, fn: Any, rule: type | None
) -> None:
    signature = inspect.signature(fn)
    assert signature.return_annotation is not inspect.Signature.empty
    untyped = [n for n, p in signature.parameters.items() if p.annotation is p.empty]
    assert not untyped, f"parameters without annotations: {untyped}"
    args = _args(fn)
    assert set(signature.parameters) - set(args) == set(), "parameters missing from Args"
    assert set(args) - set(signature.parameters) == set(), "Args naming no parameter"
    if rule is None:
        return
    for field in rules.fields_of(rule):
        if field.name in signature.parameters and field.name != "learning_rate":
            doc = " ".join(_spec(field).doc.split())
            assert args[field.name] == doc, f"{field.name}: Args and the field's line differ"


def test_the_signatures_are_in_the_source_not_made_at_import() -> None:
    for name, fn, _ in FUNCTIONS:
        function = fn.func if isinstance(fn, functools.partial) else fn
        assert "__signature__" not in vars(function), name
        assert "__wrapped__" not in vars(function), name
