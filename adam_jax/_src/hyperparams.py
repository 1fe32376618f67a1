r"""Hyperparameters stated once: as fields of a rule, from which the transformation and the
optimizer take their signatures, defaults, checks and the Args of their docstrings.

A rule's hyperparameter is a dataclass field made by :func:`hyperparam` (its default, the line
that documents it and the check of its range), or by one of the conventional ones below
(:func:`b1`, :func:`eps`, :func:`mu_dtype`, ...). :func:`transformation` turns the rule into
``scale_by_x(b1=0.9, ...)`` and :func:`optimizer` turns that into ``x(learning_rate, b1=0.9,
..., maximize=False)``: their signatures (``inspect.signature``, which IPython, Sphinx and
``optax.inject_hyperparams`` read) list the fields with their defaults, and their docstrings get
an Args section written from the fields' lines.

Example:
  >>> import dataclasses, inspect, jax.numpy as jnp
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
  >>> @rules.transformation(SignAdamRule, positional=("b1", "b2"))
  ... def scale_by_sign_adam():
  ...     '''The sign of Adam's first moment.'''
  >>> @rules.optimizer(scale_by_sign_adam)
  ... def sign_adam():
  ...     '''Sign-Adam.'''
  >>> print(inspect.signature(sign_adam))
  (learning_rate, b1=0.9, b2=0.999, *, mu_dtype=None, nu_dtype=None, maximize=False) -> ...
  >>> sign_adam(0.1, b1=1.5)
  Traceback (most recent call last):
  ...
  ValueError: b1 must be in [0, 1) (exactly 1 only as a bfloat16 or float16 rounding), got 1.5
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import textwrap
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import optax

from adam_jax._src import validation
from adam_jax._src.chains import ascent, descend
from adam_jax._src.weight_decay import add_decayed_weights

_KEY = "adam_jax.hyperparam"


@dataclasses.dataclass(frozen=True)
class Hyperparam:
    """What a hyperparameter field states besides its name and default.

    Attributes:
      doc: the line of the Args section that documents it (its meaning and accepted range).
      check: ``check(name, value)`` raising ``ValueError`` for a value out of range, or None.
      optimizer_only: an argument of the optimizer alone; the transformation leaves the field
        at its default.
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
    """Runs the check of each hyperparameter field of ``rule``: :class:`adam_jax.MomentRule`
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
    """The learning rate of a rule that applies it itself (see :func:`optimizer`)."""
    return hyperparam(
        default,
        "the learning rate, a constant >= 0 or a schedule of the 0-based step; ``None``: "
        "the update is the direction, for a learning rate applied after it.",
        validation.check_non_negative,
    )


# The arguments every transformation or optimizer of the family may add to its rule's fields.

_WEIGHT_DECAY = Hyperparam(
    "decoupled weight decay :math:`\\lambda`, a constant >= 0 or a schedule of the step.",
    validation.check_non_negative,
)
_MASK = Hyperparam("which leaves to decay (a tree of bools or a callable of the params).")
_LEARNING_RATE = Hyperparam("a constant >= 0 or a schedule of the 0-based step.")
_MAXIMIZE = Hyperparam("ascend the objective instead of descending (PyTorch's ``maximize``).")


@dataclasses.dataclass(frozen=True)
class _Argument:
    name: str
    default: Any
    spec: Hyperparam


def _arguments(
    rule_type: type,
    decay: bool,
    weight_decay: float,
    optimizer: bool = False,
    fixed: Iterable[str] = (),
) -> list[_Argument]:
    fields = fields_of(rule_type)
    left_out = {"learning_rate", *fixed}
    arguments = [
        _Argument(f.name, f.default, f.metadata[_KEY])
        for f in fields
        if f.name not in left_out and (optimizer or not f.metadata[_KEY].optimizer_only)
    ]
    if decay:
        # A rule with a weight_decay field applies its own decay: it takes the mask alone.
        if not any(f.name == "weight_decay" for f in fields):
            arguments.append(_Argument("weight_decay", weight_decay, _WEIGHT_DECAY))
        arguments.append(_Argument("mask", None, _MASK))
    return arguments


def _signature(
    arguments: Iterable[_Argument], positional: tuple[str, ...], leading: tuple[str, ...] = ()
) -> inspect.Signature:
    by_name = {a.name: a for a in arguments}
    unknown = [name for name in positional if name not in by_name]
    if unknown:
        raise TypeError(f"positional names {unknown} are not hyperparameters of the rule")
    kinds = inspect.Parameter
    parameters = [inspect.Parameter(name, kinds.POSITIONAL_OR_KEYWORD) for name in leading]
    parameters += [
        inspect.Parameter(name, kinds.POSITIONAL_OR_KEYWORD, default=by_name[name].default)
        for name in positional
    ]
    parameters += [
        inspect.Parameter(a.name, kinds.KEYWORD_ONLY, default=a.default)
        for a in by_name.values()
        if a.name not in positional
    ]
    return inspect.Signature(parameters, return_annotation=optax.GradientTransformation)


def _args_section(arguments: Iterable[_Argument]) -> str:
    lines = ["Args:"]
    for a in arguments:
        lines += textwrap.wrap(
            f"{a.name}: {a.spec.doc}", width=96, initial_indent="  ", subsequent_indent="    "
        )
    return "\n".join(lines)


def _with_args(doc: str | None, arguments: Iterable[_Argument]) -> str:
    """``doc`` (a docstring without Args) with the Args section before its Returns."""
    text, section = inspect.cleandoc(doc or ""), _args_section(arguments)
    head, marker, tail = text.partition("\nReturns:")
    return f"{head.rstrip()}\n\n{section}\n{marker}{tail}" if marker else f"{text}\n\n{section}"


def _split(rule_type: type, values: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The rule built from the ``values`` that are its fields, and the others."""
    names = {f.name for f in dataclasses.fields(rule_type) if f.init}
    rule = rule_type(**{k: v for k, v in values.items() if k in names})
    return rule, {k: v for k, v in values.items() if k not in names}


def _build(
    rule_type: type, values: dict[str, Any], build: Callable[..., Any] | None = None
) -> optax.GradientTransformation:
    """``build`` (default ``scale_by_rule``) of the rule built from ``values`` and of the
    values that are not its fields (weight decay and mask)."""
    from adam_jax._src.rule import scale_by_rule  # the core builds on this module

    rule, others = _split(rule_type, values)
    return (build or scale_by_rule)(rule, **others)


def transformation(
    rule_type: type,
    *,
    positional: tuple[str, ...] = (),
    decay: bool = False,
    build: Callable[..., optax.GradientTransformation] | None = None,
    fixed: Mapping[str, Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., optax.GradientTransformation]]:
    """Decorates a documented stub into the transformation of ``rule_type``:
    ``scale_by_x(**hyperparams)`` is ``scale_by_rule(rule_type(**hyperparams))``.

    Args:
      rule_type: a frozen dataclass of :class:`adam_jax.MomentRule` whose hyperparameters are
        :func:`hyperparam` fields.
      positional: the hyperparameters that may be passed by position, in order (optax's
        signatures); the others are keyword-only.
      decay: the transformation takes ``weight_decay`` and ``mask``, handed to the rule as
        :attr:`adam_jax.Leaf.decay` (``mask`` alone where the rule has a ``weight_decay``
        field: it applies its own decays, and ``build`` gets the mask).
      build: ``build(rule, **others)``, the transformation of the built rule, with the
        arguments that are not its fields (``weight_decay`` and ``mask``): for a rule whose
        transformation is more than :func:`adam_jax.rules.scale_by_rule` (a wrapper, a
        decay of its own). Default :func:`adam_jax.rules.scale_by_rule`.
      fixed: fields set to these values and left out of the signature, for one rule behind
        several transformations (``AdamRule(amsgrad=True)`` is ``scale_by_amsgrad``).

    Returns:
      A decorator of a function whose docstring (summary, math, Returns, Example) documents
      the transformation; the Args section is written from the fields.
    """
    fixed = dict(fixed or {})
    arguments = _arguments(rule_type, decay, 0.0, fixed=fixed)
    signature = _signature(arguments, positional)

    def decorate(documented: Callable[..., Any]) -> Callable[..., optax.GradientTransformation]:
        @functools.wraps(documented)
        def scale_by(*args: Any, **kwargs: Any) -> optax.GradientTransformation:
            values = {**fixed, **signature.bind(*args, **kwargs).arguments}
            return _build(rule_type, values, build)

        _finish(scale_by, documented, signature, arguments)
        scale_by.rule_type = rule_type  # type: ignore[attr-defined]
        scale_by.decay = decay  # type: ignore[attr-defined]
        scale_by.build = build  # type: ignore[attr-defined]
        scale_by.fixed = fixed  # type: ignore[attr-defined]
        return scale_by

    return decorate


def optimizer(
    scale_by: Callable[..., optax.GradientTransformation] | type,
    *,
    positional: tuple[str, ...] | None = None,
    defaults: Mapping[str, Any] | None = None,
    decay: bool | None = None,
    build: Callable[..., optax.GradientTransformation] | None = None,
    decayed_weights: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., optax.GradientTransformation]]:
    """Decorates a documented stub into the optimizer of a transformation made by
    :func:`transformation`: ``x(learning_rate, **hyperparams, maximize=False)``.

    The learning rate follows one convention: the last link of the chain applies it
    (:func:`adam_jax.rules.descend`), unless the rule has a ``learning_rate`` field (the hook
    for a rate that lives inside the update: LaProp's momentum of rate-weighted gradients,
    Schedule-Free's averaging), in which case the rule gets it and its update is the step.

    Args:
      scale_by: the transformation; or the rule type, for an optimizer without a public
        transformation (then ``positional`` and ``decay`` default to none).
      positional: the hyperparameters that may follow the learning rate by position (default:
        those of ``scale_by``).
      defaults: defaults of the optimizer that differ from the transformation's; among them
        ``learning_rate``'s (default: the ``learning_rate`` field's where not ``None``, else
        none: the learning rate is required).
      decay: the optimizer takes ``weight_decay`` and ``mask`` (default: where the
        transformation does); for a rule holding the learning rate that decays the params
        only when it steps them (LaProp's, SPAM's decay of the stepped params).
      build: ``build(rule, **others)``, the whole optimizer from the built rule and the
        arguments that are not its fields (``maximize``, ``mask``, ...; ``learning_rate``
        where the rule does not hold it): for a chain that is more than the default (a
        wrapper that must know ``maximize``).
      decayed_weights: for a transformation without ``decay``: the optimizer takes
        ``weight_decay`` and ``mask`` all the same, applied by a link of
        :func:`adam_jax.add_decayed_weights` after the transformation (optax's ``adamw``
        chain, whose state has that link).

    Returns:
      A decorator of a function whose docstring documents the optimizer (the Args section is
      written from the fields).
    """
    if isinstance(scale_by, type):  # a rule without a public transformation
        rule_type, scale_build, positional = scale_by, None, positional or ()
        fixed: dict[str, Any] = {}
        decay = bool(decay)
    else:
        rule_type = scale_by.rule_type  # type: ignore[attr-defined]
        scale_build = scale_by.build  # type: ignore[attr-defined]
        fixed = scale_by.fixed  # type: ignore[attr-defined]
    if decay is None:
        decay = scale_by.decay  # type: ignore[union-attr]
    rate_field = {f.name: f for f in fields_of(rule_type)}.get("learning_rate")
    rate_inside = rate_field is not None
    if decayed_weights and (decay or rate_inside or build is not None):
        raise TypeError(
            "decayed_weights is for a transformation without decay, learning_rate or build"
        )
    defaults = dict(defaults or {})
    rate_default = defaults.pop(
        "learning_rate",
        inspect.Parameter.empty
        if rate_field is None or rate_field.default is None
        else rate_field.default,
    )
    arguments = [
        dataclasses.replace(a, default=defaults.pop(a.name, a.default))
        for a in _arguments(
            rule_type, bool(decay) or decayed_weights, 0.0, optimizer=True, fixed=fixed
        )
    ]
    if defaults:
        raise TypeError(f"defaults {sorted(defaults)} are not hyperparameters of the rule")
    if positional is None:
        positional = tuple(
            p.name
            for p in inspect.signature(scale_by).parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        )
    maximize = _Argument("maximize", False, _MAXIMIZE)
    signature = _signature([*arguments, maximize], positional, leading=("learning_rate",))
    rate, *rest = signature.parameters.values()
    signature = signature.replace(parameters=[rate.replace(default=rate_default), *rest])
    documented_arguments = [_Argument("learning_rate", None, _LEARNING_RATE), *arguments, maximize]

    def decorate(documented: Callable[..., Any]) -> Callable[..., optax.GradientTransformation]:
        @functools.wraps(documented)
        def alias(*args: Any, **kwargs: Any) -> optax.GradientTransformation:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = {**fixed, **bound.arguments}
            if build is not None:
                rule, others = _split(rule_type, values)
                return build(rule, **others)
            rate, ascend = values.pop("learning_rate"), values.pop("maximize")
            if rate_inside:
                stepped = _build(rule_type, {**values, "learning_rate": rate}, scale_build)
                return optax.chain(*ascent(ascend), stepped)
            if decayed_weights:
                decay_args = {k: values.pop(k) for k in ("weight_decay", "mask")}
                moments = _build(rule_type, values, scale_build)
                return descend(rate, moments, add_decayed_weights(**decay_args), maximize=ascend)
            return descend(rate, _build(rule_type, values, scale_build), maximize=ascend)

        _finish(alias, documented, signature, documented_arguments)
        return alias

    return decorate


def _finish(
    function: Callable[..., Any],
    documented: Callable[..., Any],
    signature: inspect.Signature,
    arguments: Iterable[_Argument],
) -> None:
    if inspect.signature(documented).parameters:
        raise TypeError(f"{documented.__name__} must take no parameters: the rule states them")
    function.__signature__ = signature  # type: ignore[attr-defined]
    function.__doc__ = _with_args(documented.__doc__, arguments)
    del function.__wrapped__  # type: ignore[attr-defined]  # the stub's empty signature


def partial(function: Callable[..., Any], doc: str, **fixed: Any) -> functools.partial:
    """A thin alias, as optax writes them (``nadam = functools.partial(adam, nesterov=True)``):
    ``function`` with the arguments ``fixed``, documented by ``doc`` and placed in
    ``function``'s module (where the registry and the generated imports look for it)."""
    alias = functools.partial(function, **fixed)
    alias.__doc__ = doc
    alias.__module__ = function.__module__
    return alias
