"""The public line: what users import, what is private, and the old paths that still work.

* The public modules (``adam_jax`` and its public submodules) each declare ``__all__``, bind no
  public name outside it and export no underscore name; everything else lives in
  ``adam_jax._src``.
* The library's variants import adam_jax through ``adam_jax.rules`` (and
  ``adam_jax.quantization``) alone, SOAP's package besides two internals of its own; ``rules``
  and every variant import without the registry (no import cycle).
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


VARIANTS_DIR = REPO_ROOT / "adam_jax" / "_src" / "variants"
VARIANT_FILES = sorted(p for p in VARIANTS_DIR.rglob("*.py") if p != VARIANTS_DIR / "__init__.py")
# The public modules a variant's module may import: the rule author's, and the storages of
# adam_jax.quantization (which, unlike adam_jax itself and its registry, import no variant).
VARIANT_IMPORTS = ("adam_jax.rules", "adam_jax.quantization")
# What SOAP's package takes from adam_jax._src besides its own modules: internals that only it
# uses (docs/adding_a_variant.md names them).
SOAP_INTERNALS = {
    ("adam_jax._src.orthonormalization", "each_matrix"),
    ("adam_jax._src.orthonormalization", "at_full_precision"),
    ("adam_jax._src.orthonormalization", "full_precision_matmul"),
    ("adam_jax._src.branching", "on_platform"),
}


def _adam_jax_imports(path: Path) -> set[tuple[str, str]]:
    """``(module, name)`` for each name a module imports from adam_jax: ``from m import name``,
    and ``(m, "")`` for ``import m``."""
    found: set[tuple[str, str]] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adam_jax"):
            found |= {(node.module or "", alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {(a.name, "") for a in node.names if a.name.startswith("adam_jax")}
    return found


def _disallowed_imports(path: Path) -> list[tuple[str, str]]:
    """The imports of a variant's module that are neither :data:`VARIANT_IMPORTS` (``from
    adam_jax import rules`` included), nor its own package's modules, nor SOAP's internals."""
    package = path.parent
    own = (
        None
        if package == VARIANTS_DIR or not package.is_relative_to(VARIANTS_DIR)
        else "adam_jax._src.variants." + package.relative_to(VARIANTS_DIR).as_posix()
    )
    disallowed = []
    for module, name in sorted(_adam_jax_imports(path)):
        if module in VARIANT_IMPORTS or (module, name) == ("adam_jax", "rules"):
            continue
        if own is not None and (module == own or module.startswith(own + ".")):
            continue
        if own == "adam_jax._src.variants.soap" and (module, name) in SOAP_INTERNALS:
            continue
        disallowed.append((module, name))
    return disallowed


@pytest.mark.parametrize(
    "path", VARIANT_FILES, ids=lambda p: p.relative_to(VARIANTS_DIR).as_posix()
)
def test_the_library_variants_import_adam_jax_through_rules(path: Path) -> None:
    """What docs/adding_a_variant.md promises: a variant is written with ``adam_jax.rules``
    (and the storages of ``adam_jax.quantization``), not with the private package."""
    assert not _disallowed_imports(path), f"{path.name} imports {_disallowed_imports(path)}"


def test_the_import_reader_reads_every_form(tmp_path: Path) -> None:
    text = (
        "import adam_jax._src.rule\n"
        "from adam_jax import rules\n"
        "from adam_jax.rules import (\n    Leaf,\n    Moment,\n)\n"
        "from adam_jax._src.branching import on_platform, switch\n"
        "from adam_jax._src.variants.soap.layout import SoapLayout\n"
    )
    module = tmp_path / "m.py"
    module.write_text(text)
    assert _adam_jax_imports(module) == {
        ("adam_jax._src.rule", ""),
        ("adam_jax", "rules"),
        ("adam_jax.rules", "Leaf"),
        ("adam_jax.rules", "Moment"),
        ("adam_jax._src.branching", "on_platform"),
        ("adam_jax._src.branching", "switch"),
        ("adam_jax._src.variants.soap.layout", "SoapLayout"),
    }
    module.write_text("from adam_jax._src.rule import Leaf\nfrom adam_jax import registry\n")
    assert _disallowed_imports(module) == [("adam_jax", "registry"), ("adam_jax._src.rule", "Leaf")]


# A fresh interpreter in which ``adam_jax`` is a bare package (its ``__init__``, which imports
# the registry and every variant, is not run) and importing the registry fails.
_WITHOUT_REGISTRY = """
import sys, types
import importlib.abc

class NoRegistry(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("adam_jax.registry", "adam_jax._src.registry"):
            raise ImportError(f"{name} imported")
        return None

sys.meta_path.insert(0, NoRegistry())
package = types.ModuleType("adam_jax")
package.__path__ = [sys.argv[1]]
sys.modules["adam_jax"] = package
import importlib
for name in sys.argv[2:]:
    importlib.import_module(name)
from adam_jax.rules import OptimizerInfo, Paper
loaded = sorted(m for m in sys.modules if m.startswith("adam_jax._src.variants"))
print(OptimizerInfo.__name__, Paper.__name__, loaded)
"""


def _run_without_registry(*modules: str) -> str:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_REGISTRY, str(REPO_ROOT / "adam_jax"), *modules],
        capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""}, timeout=300,
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_row_types_import_without_the_registry_or_a_variant() -> None:
    """``adam_jax.rules`` (the row types with it) needs neither the registry nor a variant: a
    variant's module that declares its row imports no module that imports it back."""
    assert _run_without_registry("adam_jax.rules").strip() == "OptimizerInfo Paper []"


def test_every_variant_module_imports_without_the_registry() -> None:
    modules = sorted(
        "adam_jax._src.variants." + p.relative_to(VARIANTS_DIR).with_suffix("").as_posix()
        .replace("/", ".").removesuffix(".__init__")
        for p in VARIANT_FILES
    )  # fmt: skip
    loaded = _run_without_registry(*modules)
    assert (
        "adam_jax._src.variants.soap.transform" in loaded
        and "adam_jax._src.variants.grams" in loaded
    )


def test_the_blocked_interpreter_refuses_the_registry() -> None:
    """The check above can fail: importing ``adam_jax.registry`` there is an error."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_REGISTRY, str(REPO_ROOT / "adam_jax"), "adam_jax.registry"],
        capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""}, timeout=300,
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode != 0 and "adam_jax.registry imported" in result.stderr


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
