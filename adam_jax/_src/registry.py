"""The registry of the Adam family: one row per optimizer, declared as ``REGISTRY_ROWS`` in the
module that defines it and collected here, in the order of :data:`MODULES`. The tests' table,
the docs, the benchmarks and the example's ``--optimizer`` choices are derived from it or
checked against it."""

from __future__ import annotations

from typing import Any

import optax

from adam_jax._src import aliases
from adam_jax._src.optimizer_info import GROUPS, OptimizerInfo
from adam_jax._src.variants import (
    adabelief,
    adam_atan2,
    adam_mini,
    ademamix,
    adopt,
    cautious,
    grams,
    lamb,
    laprop,
    mars,
    radam,
    schedule_free,
    soap,
    spam,
    stable_adamw,
    stable_spam,
)

#: The modules that declare optimizers, in registry order: a new optimizer's module is added here.
MODULES = (aliases, adopt, ademamix, cautious, stable_adamw, adam_atan2, schedule_free, radam,
           adabelief, lamb, adam_mini, laprop, grams, soap, mars, spam, stable_spam)  # fmt: skip

OPTIMIZERS: tuple[OptimizerInfo, ...] = tuple(
    row for module in MODULES for row in module.REGISTRY_ROWS
)

_BY_NAME = {info.name: info for info in OPTIMIZERS}

_VARIANTS = "adam_jax._src.variants."


def declaring_module(name: str) -> str:
    """The module of :data:`MODULES` that an object of module ``name`` (its ``__module__``)
    belongs to: ``name`` itself, or for a module of a variant written as a package
    (``adam_jax._src.variants.soap.rule``) the package (``adam_jax._src.variants.soap``), which
    re-exports its optimizer, moment estimate and ``REGISTRY_ROWS``."""
    if name.startswith(_VARIANTS):
        return _VARIANTS + name.removeprefix(_VARIANTS).split(".")[0]
    return name


def get(name: str) -> OptimizerInfo:
    """The row of optimizer ``name``.

    Raises:
      ValueError: for a name that is not in the registry (the message lists the names).
    """
    if name not in _BY_NAME:
        raise ValueError(f"unknown optimizer {name!r}, expected one of {names()}")
    return _BY_NAME[name]


def names(group: str | None = None) -> tuple[str, ...]:
    """The optimizers' names in registry order, all of them or those of ``group``."""
    if group is not None and group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS} or None, got {group!r}")
    return tuple(info.name for info in OPTIMIZERS if group is None or info.group == group)


def create(
    name: str, learning_rate: optax.ScalarOrSchedule | None = None, **options: Any
) -> optax.GradientTransformation:
    """The optimizer ``name`` with ``learning_rate`` (default: its tuned MNIST rate) and options.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.registry.create("radam", 0.1)
      >>> updates, _ = tx.update(jnp.array([0.5]), tx.init(jnp.zeros(1)))
      >>> print(updates)  # rho_1 = 1 < 5: plain momentum, -0.1 * g
      [-0.05]
    """
    return get(name).create(learning_rate, **options)
