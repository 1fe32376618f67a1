"""The public line: what users import, what is private, and the old paths that still work.

* The public modules (``adam_jax`` and its public submodules) each declare ``__all__``, bind no
  public name outside it and export no underscore name; everything else lives in
  ``adam_jax._src``.
* ``adam_jax.rules`` gives a rule author every name the library's own variants import.
* The docs, README and notebooks import nothing private.
* The rule toolkit's names of the top level (``adam_jax.MomentRule``...) resolve until 0.5,
  with a ``DeprecationWarning`` naming ``adam_jax.rules``.
* The import paths of 0.3 (``adam_jax.moments``, ``adam_jax.variants.adopt``...) are gone: they
  fail with the normal ImportError (the CHANGELOG lists where each name lives now).
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import types
from pathlib import Path

import pytest

import adam_jax
from adam_jax import rules

REPO_ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = (
    "adam_jax",
    "adam_jax.flat",
    "adam_jax.quantization",
    "adam_jax.registry",
    "adam_jax.rules",
    "adam_jax.sharding",
)


def test_public_modules_are_the_submodules_that_adam_jax_exports() -> None:
    exported = {
        f"adam_jax.{name}"
        for name in adam_jax.__all__
        if isinstance(getattr(adam_jax, name), types.ModuleType)
    }
    assert exported | {"adam_jax"} == set(PUBLIC_MODULES)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_a_public_module_binds_exactly_its_all(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert not [n for n in exported if n.startswith("_")], "underscore names in __all__"
    assert exported == sorted(exported, key=str.lower) or exported == sorted(exported)
    for member in exported:
        assert hasattr(module, member), f"{name}.__all__ names the missing {member}"
    bound = {
        n
        for n, value in vars(module).items()
        if not n.startswith("_") and not (n == "annotations" and name != "adam_jax")
    }
    assert bound - set(exported) == set(), f"{name} binds public names outside __all__"


def _imports_from_src(path: Path) -> set[str]:
    """The names a module of ``adam_jax/_src`` takes from the rest of ``_src``: the names of
    ``from adam_jax._src.x import name``, and ``module.name`` for ``from adam_jax._src import
    module``."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adam_jax._src"):
            if node.module == "adam_jax._src":
                modules |= {alias.asname or alias.name for alias in node.names}
            else:
                names |= {alias.name for alias in node.names}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
        ):
            names.add(node.attr)
    return names


VARIANT_FILES = sorted((REPO_ROOT / "adam_jax" / "_src" / "variants").glob("[!_]*.py"))


@pytest.mark.parametrize("path", VARIANT_FILES, ids=lambda p: p.stem)
def test_rules_gives_everything_the_library_variants_use(path: Path) -> None:
    missing = sorted(
        name
        for name in _imports_from_src(path)
        if not hasattr(rules, name)
        and name not in adam_jax.__all__
        and name not in adam_jax.registry.__all__  # each module declares its registry row
    )
    assert not missing, f"{path.name} uses names that adam_jax.rules does not export: {missing}"


def test_the_import_parser_reads_both_forms(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from adam_jax._src import validation\n"
        "from adam_jax._src.rule import (\n    Leaf,\n    Moment,\n)\n"
        "validation.check_decay('b1', 0.9)\n"
    )
    assert _imports_from_src(source) == {"Leaf", "Moment", "check_decay"}


_PRIVATE_IMPORT = re.compile(r"\badam_jax\._[a-zA-Z]")  # adam_jax.__version__ is public


_FENCE = re.compile(r"^```(?:python|\{code-cell\}[^\n]*)\n(.*?)^```", re.M | re.S)


def _documentation_code() -> dict[str, str]:
    """The code users copy: the code blocks of the docs pages and READMEs, and the notebooks'
    code cells (prose may name the private package when it says where code lives)."""
    texts = {}
    pages = [*REPO_ROOT.glob("*.md"), *(REPO_ROOT / "docs").glob("*.md")]
    pages += list((REPO_ROOT / "examples").rglob("*.md"))
    for path in pages:
        blocks = _FENCE.findall(path.read_text())
        texts[str(path.relative_to(REPO_ROOT))] = "\n".join(blocks)
    for path in (REPO_ROOT / "examples").glob("*.ipynb"):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        texts[str(path.relative_to(REPO_ROOT))] = code
    return texts


def test_documentation_code_imports_nothing_private() -> None:
    offenders = {
        name: _PRIVATE_IMPORT.findall(text)
        for name, text in _documentation_code().items()
        if _PRIVATE_IMPORT.search(text)
    }
    assert not offenders


def test_the_code_block_reader_finds_private_imports() -> None:
    page = "Prose about adam_jax._src.\n```python\nfrom adam_jax._src import rule\n```\n"
    (block,) = _FENCE.findall(page)
    assert _PRIVATE_IMPORT.findall(block) == ["adam_jax._s"]


def test_examples_import_nothing_private() -> None:
    sources = [*(REPO_ROOT / "examples").rglob("*.py"), *(REPO_ROOT / "benchmarks").rglob("*.py")]
    offenders = [
        str(p.relative_to(REPO_ROOT)) for p in sources if _PRIVATE_IMPORT.search(p.read_text())
    ]
    assert not offenders


@pytest.mark.parametrize(
    "old", ["adam_jax.moments", "adam_jax.rule", "adam_jax.aliases", "adam_jax.variants.adopt"]
)
def test_a_path_of_0_3_fails_with_the_normal_import_error(old: str) -> None:
    with pytest.raises(ModuleNotFoundError, match="No module named .adam_jax"):
        importlib.import_module(old)


@pytest.mark.parametrize(
    "name", ["Leaf", "Moment", "MomentRule", "map_tensors", "moving_average_terms", "scale_by_rule"]
)
def test_the_rule_toolkit_left_the_top_level_with_a_warning(name: str) -> None:
    """The core's names of 0.3's top level are in ``adam_jax.rules`` alone; the old spelling
    still gives the same object, with a warning that names where it lives."""
    assert name not in adam_jax.__all__ and name not in vars(adam_jax)
    with pytest.warns(DeprecationWarning, match=rf"adam_jax\.rules\.{name}\b.* 0\.5"):
        moved = getattr(adam_jax, name)
    assert moved is getattr(rules, name)


def test_an_unknown_top_level_name_is_the_normal_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'adam_jax' has no attribute 'adamw_9bit'"):
        _ = adam_jax.adamw_9bit  # type: ignore[attr-defined]  # mypy sees no __getattr__
