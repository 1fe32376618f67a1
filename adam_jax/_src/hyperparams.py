r"""Hyperparameters stated once, as fields of a rule.

A rule's hyperparameter is a dataclass field made by :func:`hyperparam` (its default, the line
that documents it and the check of its range), or by one of the conventional ones below
(:func:`b1`, :func:`eps`, :func:`mu_dtype`, ...); the rule runs the checks when it is built
(:func:`check_fields`). The transformation and the optimizer of a rule are ordinary functions
that repeat the fields as parameters, with their annotations, defaults and Args, as optax
writes its aliases; ``tests/test_hyperparams.py`` checks, for every optimizer of the registry,
that the parameters are the rule's fields with the same defaults and that each Args line is
the field's.

Example:
  >>> import dataclasses, jax.numpy as jnp, optax
  >>> from adam_jax import rules
  >>> @dataclasses.dataclass(frozen=True, kw_only=True)
  ... class SignAdamRule(rules.AdamLikeRule):
  ...     b1: float = rules.b1()
  ...     b2: float = rules.b2()
  ...     mu_dtype: object = rules.mu_dtype()
  ...     nu_dtype: object = rules.nu_dtype()
  ...     def update(self, g, moments, scalars, leaf):
  ...         mu = rules.moving_average(moments["mu"], g, scalars.w1)
  ...         nu = rules.moving_average(moments["nu"], rules.abs_sq(g), scalars.w2)
  ...         return leaf.add_decay(jnp.sign(mu)), {"mu": mu, "nu": nu}
  >>> def sign_adam(
  ...     learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999
  ... ) -> optax.GradientTransformation:
  ...     return rules.descend(learning_rate, rules.scale_by_rule(SignAdamRule(b1=b1, b2=b2)))
  >>> sign_adam(0.1, b1=1.5)
  Traceback (most recent call last):
  ...
  ValueError: b1 must be in [0, 1) (exactly 1 only as a bfloat16 or float16 rounding), got 1.5
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from adam_jax._src import validation

_KEY = "adam_jax.hyperparam"


@dataclasses.dataclass(frozen=True)
class Hyperparam:
    """What a hyperparameter field states besides its name and default.

    Attributes:
      doc: the line that documents it (its meaning and accepted range), which the Args of the
        transformation and the optimizer repeat (``tests/test_hyperparams.py`` compares them).
      check: ``check(name, value)`` raising ``ValueError`` for a value out of range, or None.
      optimizer_only: an argument of the optimizer alone (a second learning rate, as
        ``learning_rate``); the transformation leaves the field at its default.
    """

    doc: str
    check: Callable[[str, Any], None] | None = None
    optimizer_only: bool = False


def hyperparam(
    default: Any,
    doc: str,
    check: Callable[[str, Any], None] | None = None,
    *,
    optimizer_only: bool = False,
) -> Any:
    """A rule's hyperparameter: a dataclass field with its default, its line of documentation
    and the check of its range (run when the rule is built; concrete values only, so traced and
    scheduled values pass, see :mod:`adam_jax.rules`' checks). ``optimizer_only``: an argument
    of the optimizer alone (a second learning rate, as ``learning_rate``), which the
    transformation leaves at its default."""
    return dataclasses.field(
        default=default, metadata={_KEY: Hyperparam(doc, check, optimizer_only)}
    )


def fields_of(rule_type: type) -> list[dataclasses.Field]:
    """The hyperparameter fields of ``rule_type``, in declaration order."""
    return [f for f in dataclasses.fields(rule_type) if _KEY in f.metadata]


def check_fields(rule: Any) -> None:
    """Runs the check of each hyperparameter field of ``rule``: :class:`adam_jax.rules.MomentRule`
    does in ``__post_init__``, and so must a dataclass of hyperparameters that is not a rule
    (an optimizer built on another's rule, as Adam-mini on Adam's)."""
    for field in fields_of(type(rule)):
        spec: Hyperparam = field.metadata[_KEY]
        if spec.check is not None:
            spec.check(field.name, getattr(rule, field.name))


def choice(*choices: str) -> Callable[[str, Any], None]:
    """The check of a hyperparameter that takes one of ``choices``."""
    return functools.partial(_check_choice, choices=choices)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    validation.check_choice(name, value, choices)


def at_least(lower: float) -> Callable[[str, Any], None]:
    """The check of a hyperparameter that is finite and >= ``lower``."""
    return functools.partial(_check_at_least, lower=lower)


def _check_at_least(name: str, value: Any, lower: float) -> None:
    validation.check_at_least(name, value, lower)


def integer(lower: int) -> Callable[[str, Any], None]:
    """The check of a whole-number hyperparameter >= ``lower``."""
    return functools.partial(_check_integer, lower=lower)


def _check_integer(name: str, value: Any, lower: int) -> None:
    validation.check_integer(name, value, lower)


# The conventional hyperparameters of the family, documented once.


def b1(default: float = 0.9) -> Any:
    """The decay of the first moment."""
    return hyperparam(default, "decay of the first moment, in [0, 1).", validation.check_decay)


def b2(default: float = 0.999) -> Any:
    """The decay of the second moment."""
    return hyperparam(default, "decay of the second moment, in [0, 1).", validation.check_decay)


def eps(default: float = 1e-8) -> Any:
    """The term added to the denominator outside the square root."""
    return hyperparam(
        default,
        "added to the denominator outside the square root, >= 0.",
        validation.check_non_negative,
    )


def eps_root(default: float = 0.0) -> Any:
    """The term added inside the square root."""
    return hyperparam(default, "added inside the square root, >= 0.", validation.check_non_negative)


def mu_dtype() -> Any:
    """The storage of the first moment."""
    return hyperparam(
        None,
        "storage of the first moment (``None``: the params' dtype; a dtype; or a "
        ":class:`adam_jax.MomentStorage`).",
    )


def nu_dtype() -> Any:
    """The storage of the second moment."""
    return hyperparam(None, "storage of the second moment, as ``mu_dtype``.")


def nesterov() -> Any:
    """Nesterov momentum."""
    return hyperparam(False, "Nesterov momentum (as NAdam).")


def learning_rate(default: Any = None) -> Any:
    """The learning rate of a rule that applies it itself (LaProp's momentum of rate-weighted
    gradients, Schedule-Free's averaging): the optimizer hands it to the rule, whose update is
    the step, instead of ending its chain with :func:`adam_jax.rules.descend`; a
    transformation leaves it at its default."""
    return hyperparam(
        default,
        "the learning rate, a constant >= 0 or a schedule of the 0-based step; ``None``: "
        "the update is the direction, for a learning rate applied after it.",
        validation.check_non_negative,
    )


def partial(function: Callable[..., Any], doc: str, **fixed: Any) -> functools.partial:
    """A thin alias, as optax writes them (``nadam = functools.partial(adam, nesterov=True)``):
    ``function`` with the arguments ``fixed``, documented by ``doc`` and placed in
    ``function``'s module (where the registry and the generated imports look for it)."""
    alias = functools.partial(function, **fixed)
    alias.__doc__ = doc
    alias.__module__ = function.__module__
    return alias
