"""The registry of the family (``adam_jax.registry``) and everything derived from it or checked
against it: a new optimizer that misses any of these places fails here.

* every optimizer exported by ``adam_jax`` has a row, and every row names an export;
* every moment estimate and rule exported is some row's, and rules are named ``XRule`` after
  their optimizer ``x`` and exported by ``adam_jax.rules``;
* every variant has a test row (``TESTS`` of ``tests/references/<module>.py``), and every test
  row a variant;
* its docstring cites its paper; README's family table lists the rows; the API page documents
  the alias, transformation and companions; the MNIST example and the benchmarks offer it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import operator
import pkgutil
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
import references
from variants import VARIANTS, reference_module_name

import adam_jax
from adam_jax import registry, rules
from adam_jax._src.registry import declaring_module

REPO_ROOT = Path(__file__).resolve().parent.parent
ROWS = registry.OPTIMIZERS
NAME = operator.attrgetter("name")  # test ids: the same in every xdist worker
# Transformations exported beside the moment estimates: pieces of every alias, not optimizers.
PIECES = {"scale_by_bias_correction", "scale_by_learning_rate", "scale_by_rule"}


def _exported_optimizers() -> set[str]:
    """Names in ``adam_jax.__all__`` of functions (or partials of one, as ``nadam``) whose first
    parameter is the learning rate."""
    names = set()
    for name in adam_jax.__all__:
        value = getattr(adam_jax, name)
        function = value.func if isinstance(value, functools.partial) else value
        if inspect.isfunction(function) and not name.startswith("scale_by_"):
            parameters = list(inspect.signature(value).parameters)
            if parameters[:1] == ["learning_rate"]:
                names.add(name)
    return names


def test_every_exported_optimizer_has_a_row_and_every_row_an_export() -> None:
    assert set(registry.names()) == _exported_optimizers()
    for info in ROWS:
        assert getattr(adam_jax, info.name) is info.alias, info.name
        assert info.group in ("adam", "variant"), info.name


def test_names_are_unique_and_groups_partition_them() -> None:
    names = registry.names()
    assert len(set(names)) == len(names)
    assert set(registry.names("adam")) | set(registry.names("variant")) == set(names)
    assert not set(registry.names("adam")) & set(registry.names("variant"))


def test_every_exported_moment_estimate_belongs_to_a_row() -> None:
    exported = {n for n in adam_jax.__all__ if n.startswith("scale_by_")} - PIECES
    transformations = {info.transformation for info in ROWS if info.transformation}
    for name in exported:
        assert getattr(adam_jax, name) in transformations, f"{name} is in no registry row"
    for info in ROWS:
        if info.transformation is not None:
            assert getattr(adam_jax, info.transformation.__name__) is info.transformation


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


@pytest.mark.parametrize("info", [i for i in ROWS if i.group == "variant" and i.rule], ids=NAME)
def test_a_variants_rule_is_named_after_it_and_in_its_module(info: registry.OptimizerInfo) -> None:
    assert info.rule is not None
    assert info.rule.__name__ == f"{_camel(info.name)}Rule"
    # The same module, or the same package for a variant written as one (soap).
    assert declaring_module(info.rule.__module__) == declaring_module(info.alias.__module__)


def test_rules_is_the_toolkit_not_the_library_rules() -> None:
    library_rules = {info.rule for info in ROWS if info.rule is not None}
    exported = {getattr(rules, name) for name in rules.__all__}
    assert not library_rules & exported


@pytest.mark.parametrize("info", ROWS, ids=NAME)
def test_each_row_is_declared_by_the_module_of_its_optimizer(info: registry.OptimizerInfo) -> None:
    module = importlib.import_module(declaring_module(info.alias.__module__))
    assert info in module.REGISTRY_ROWS


def test_every_list_generated_from_the_registry_is_current() -> None:
    """README's and docs/index.md's family lists, docs/api.rst's entries and adam_jax's imports
    and ``__all__``: ``python docs/family.py`` rewrites them."""
    sys.path.insert(0, str(REPO_ROOT / "docs"))
    try:
        family = importlib.import_module("family")
    finally:
        sys.path.remove(str(REPO_ROOT / "docs"))
    assert family.stale() == [], "run: python docs/family.py"


def test_which_adam_lists_every_variant() -> None:
    text = (REPO_ROOT / "docs" / "which_adam.md").read_text()
    table = text.split("| optimizer |", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert listed == ["adamw", *registry.names("variant")]


def test_every_variant_has_a_test_row_and_every_test_row_a_variant() -> None:
    assert [v.name for v in VARIANTS] == list(registry.names("variant"))
    declared = set()
    for module_info in pkgutil.iter_modules(references.__path__):
        module = importlib.import_module(f"references.{module_info.name}")
        for row in getattr(module, "TESTS", ()):
            declared.add(row.name)
            assert reference_module_name(row.name) == module.__name__, row.name
    assert declared == set(registry.names("variant"))


@pytest.mark.parametrize("info", ROWS, ids=NAME)
def test_the_docstring_cites_the_registrys_paper(info: registry.OptimizerInfo) -> None:
    assert info.paper.url in (info.alias.__doc__ or ""), info.name


@pytest.mark.parametrize("info", [i for i in ROWS if i.optax_name], ids=NAME)
def test_the_optax_namesake_exists_with_the_same_name(info: registry.OptimizerInfo) -> None:
    namesake = info.optax_namesake()
    assert callable(namesake)
    assert info.optax_name is not None and info.optax_name.endswith("." + info.name)


def _readme_table_rows() -> list[list[str]]:
    text = (REPO_ROOT / "README.md").read_text()
    block = text.split("<!-- family table -->", 1)[1].split("<!-- end of family table -->")[0]
    lines = [line for line in block.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_readme_table_is_the_registry() -> None:
    rows = _readme_table_rows()
    assert [row[0].strip("`") for row in rows] == list(registry.names())
    for row, info in zip(rows, ROWS, strict=True):
        assert row[1] == info.summary
        assert f"({info.paper.url})" in row[2] and info.paper.venue in row[2]
        assert row[3] == (f"`{info.optax_name}`" if info.optax_name else "—")


def test_api_page_documents_each_rows_names() -> None:
    page = (REPO_ROOT / "docs" / "api.rst").read_text()
    for info in ROWS:
        names = [info.name, *info.companions]
        if info.transformation is not None:
            names.append(info.transformation.__name__)
        for name in names:
            assert re.search(rf"^\.\. auto(function|class):: {name}\b", page, re.M), name


def test_example_and_benchmarks_offer_every_row() -> None:
    from benchmarks.sections import variants as variant_benchmarks
    from examples.mnist import optimizers

    assert set(registry.names()) <= set(optimizers.NAMES)
    assert tuple(optimizers.VARIANTS) == registry.names("variant")
    assert list(variant_benchmarks.VARIANTS) == list(registry.names("variant"))
    for info in ROWS:
        assert optimizers.PEAK_LEARNING_RATES[info.name] == info.learning_rate
        assert (info.name in optimizers.SCHEDULE_FREE) == info.schedule_free


@pytest.mark.parametrize("info", ROWS, ids=NAME)
def test_create_applies_the_rate_and_the_example_options(info: registry.OptimizerInfo) -> None:
    params = {"w": jnp.full(5, 0.5)}
    grads = {"w": jnp.linspace(-1.0, 1.0, 5)}
    created = registry.create(info.name, 1e-2)
    direct = info.alias(1e-2, **info.example_options)
    ours, _ = created.update(grads, created.init(params), params)
    theirs, _ = direct.update(grads, direct.init(params), params)
    assert (ours["w"] == theirs["w"]).all()


def test_unknown_names_are_refused_with_the_list() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'adamm'.*'adam'"):
        registry.get("adamm")
    with pytest.raises(ValueError, match="group must be one of"):
        registry.names("modern")
