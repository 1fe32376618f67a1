"""The registry of the Adam family: one row per optimizer, declared as ``REGISTRY_ROWS`` in the
module that defines it and collected here, in the order of :data:`MODULES` (the variant modules
found by name). The tests' table,
the docs, the benchmarks and the example's ``--optimizer`` choices are derived from it or
checked against it."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

import optax

from adam_jax._src import aliases, variants
from adam_jax._src.optimizer_info import GROUPS, OptimizerInfo


def _variant_modules() -> tuple[ModuleType, ...]:
    """The modules (or packages) of :mod:`adam_jax._src.variants` that declare
    ``REGISTRY_ROWS``, by name: a new variant's module is found, not listed."""
    found = []
    for module_info in sorted(pkgutil.iter_modules(variants.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{variants.__name__}.{module_info.name}")
        if hasattr(module, "REGISTRY_ROWS"):
            found.append(module)
    return tuple(found)


#: The modules that declare optimizers, in registry order: Adam's aliases, then every variant
#: module in the order of their names.
MODULES = (aliases, *_variant_modules())

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
