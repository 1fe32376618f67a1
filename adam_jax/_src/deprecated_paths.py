"""The import paths of adam_jax 0.3, kept working for one release with a DeprecationWarning.

Version 0.4 moved the implementation into the private package ``adam_jax._src``; users import
from :mod:`adam_jax`, :mod:`adam_jax.rules` and the public submodules. A module of 0.3 (say
``adam_jax.moments``) is still importable: a finder on ``sys.meta_path`` builds it as a module
whose attributes come from its new home, each read warning where the name lives now.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any

_VARIANTS = (
    "adabelief",
    "adam_atan2",
    "ademamix",
    "adopt",
    "cautious",
    "lamb",
    "radam",
    "schedule_free",
    "stable_adamw",
)
_MODULES = (
    "aliases",
    "bias_correction",
    "kahan",
    "learning_rate",
    "moments",
    "moving_average",
    "rounding",
    "rule",
    "schedules",
    "storage",
    "weight_decay",
)
#: Old module -> the private module that holds its code now.
MOVED: dict[str, str] = {
    **{f"adam_jax.{name}": f"adam_jax._src.{name}" for name in _MODULES},
    "adam_jax.variants": "adam_jax._src.variants",
    **{f"adam_jax.variants.{name}": f"adam_jax._src.variants.{name}" for name in _VARIANTS},
}
#: Where a moved name is public now, searched in this order.
PUBLIC_MODULES = ("adam_jax", "adam_jax.rules", "adam_jax.quantization")


def public_path(name: str, value: Any) -> str | None:
    """The public dotted path of ``value`` (read as ``name``), or None if it is private."""
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        if name in getattr(module, "__all__", ()) and getattr(module, name) is value:
            return f"{module_name}.{name}"
    return None


def _moved_value(old: str, name: str) -> Any:
    """``name`` of old module ``old``: from its new module, or from the private module it moved
    to within ``_src`` (``EPS_PLACEMENTS`` went from the aliases to the moment estimates)."""
    for module_name in (MOVED[old], *MOVED.values()):
        module = importlib.import_module(module_name)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {old!r} has no attribute {name!r}")


class _MovedModule(types.ModuleType):
    """An old module: reading a name imports it from its new home, with a warning."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _moved_value(self.__name__, name)
        if isinstance(value, types.ModuleType):
            return value
        new = public_path(name, value)
        advice = f"import {new} instead" if new else "it is private now and will be removed"
        warnings.warn(
            f"{self.__name__}.{name} is deprecated since adam_jax 0.4: {advice}",
            DeprecationWarning,
            stacklevel=2,
        )
        return value


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old modules of :data:`MOVED` and loads them as :class:`_MovedModule`."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        is_package = fullname == "adam_jax.variants"
        return importlib.util.spec_from_loader(fullname, self, is_package=is_package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _MovedModule(spec.name, f"Deprecated: moved to {MOVED[spec.name]}.")

    def exec_module(self, module: types.ModuleType) -> None:
        del module  # nothing to run: attributes are read from the new module on demand


def install() -> None:
    """Puts the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
