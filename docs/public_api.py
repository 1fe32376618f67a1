"""The public names of adam_jax, which the API page (``docs/api.rst``) must document.

Read by the Sphinx build (``conf.py`` fails the build on a missing entry) and by
``tests/test_docs.py`` (which checks the page without Sphinx); it imports nothing of Sphinx.
"""

from __future__ import annotations

import importlib
import types

import adam_jax


def public_symbols() -> set[str]:
    """Dotted names the API page must document.

    ``adam_jax.__all__``, and for a submodule in it the module itself plus the names of its own
    ``__all__`` (or, without one, its public classes and functions) that are not the same
    objects as top-level names (those are documented once, at the top) nor, for a class or a
    function, as a name of a submodule before it in ``adam_jax.__all__`` (documented there:
    ``adam_jax.rules.OptimizerInfo`` is ``adam_jax.registry.OptimizerInfo``).
    """
    names: set[str] = set()
    earlier: list[object] = []  # the classes and functions of the submodules already read
    for name in adam_jax.__all__:
        value = getattr(adam_jax, name)
        if not isinstance(value, types.ModuleType):
            names.add(f"adam_jax.{name}")
            continue
        module = importlib.import_module(value.__name__)
        names.add(module.__name__)
        members = getattr(module, "__all__", None)
        if members is None:
            members = [
                member
                for member, obj in vars(module).items()
                if not member.startswith("_")
                and getattr(obj, "__module__", None) == module.__name__
            ]
        found = []
        for member in members:
            obj = getattr(module, member)
            # vars, not getattr: the names that left the top level still resolve there.
            if vars(adam_jax).get(member) is obj:
                continue
            if (isinstance(obj, type) or callable(obj)) and any(obj is e for e in earlier):
                continue
            names.add(f"{module.__name__}.{member}")
            found.append(obj)
        earlier += [obj for obj in found if isinstance(obj, type) or callable(obj)]
    return names
