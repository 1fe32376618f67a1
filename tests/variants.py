"""The one table of the modern Adam family that the test modules iterate, collected from the
registry: for every optimizer of ``adam_jax.registry.names("variant")``, the :class:`Variant`
row that its reference module (``tests/references/<module>.py``, named after the adam_jax
module of the alias) declares in ``TESTS``.

Adding a variant to adam_jax is its module, its reference (with its ``TESTS`` row) and its
registry row: the test modules (``test_variants_*.py``, the sharding, ZeRO-1, low-precision and
export tests) pick it up, and ``tests/test_registry.py`` fails while any of them is missing.
"""

from __future__ import annotations

import importlib

from variant_spec import Variant

import adam_jax
from adam_jax._src.registry import declaring_module


def reference_module_name(name: str) -> str:
    """The reference module of optimizer ``name``: ``references.<its adam_jax module>`` (of a
    variant written as a package, the package's name)."""
    module = declaring_module(adam_jax.registry.get(name).alias.__module__)
    return "references." + module.rpartition(".")[2]


def _collect() -> tuple[Variant, ...]:
    rows = []
    for name in adam_jax.registry.names("variant"):
        module = importlib.import_module(reference_module_name(name))
        rows.extend(row for row in getattr(module, "TESTS", ()) if row.name == name)
    return tuple(rows)


VARIANTS = _collect()
BY_NAME = {variant.name: variant for variant in VARIANTS}
PER_TENSOR = {variant.name for variant in VARIANTS if variant.per_tensor}
CASES = [(variant, case) for variant in VARIANTS for case in variant.cases]
