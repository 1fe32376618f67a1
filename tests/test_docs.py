"""The documentation site (docs/) and the conventions of adam_jax's docstrings.

* The API page documents exactly the public names: ``adam_jax.__all__`` and the ``__all__`` of
  the submodules it exports.
* The Sphinx build passes with warnings as errors (skipped when Sphinx is not installed, except
  in CI, where ``CI=true`` turns the skip into a failure).
* The Python code on the pages runs.
* Every docstring Example shows a value (a ``>>>`` line with expected output, which the doctest
  run ``python -m pytest --doctest-modules adam_jax`` then checks), and every optimizer alias
  cites its sources in a ``References:`` section.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import NamedTuple

import pytest

import adam_jax

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"
API_PAGE = DOCS / "api.rst"

ALIASES = adam_jax.registry.names()


class CodePage(NamedTuple):
    """A page whose ```python blocks run, in order, as one script."""

    needs: tuple[str, ...] = ()  # optional packages: the test skips without them
    prelude: str = ""  # run first, for pages that show fragments
    own_test: str = ""  # the test that runs the page's code its own way, instead of this one


CODE_PAGES = {
    "index.md": CodePage(),
    "coming_from_optax.md": CodePage(needs=("orbax.checkpoint",)),
    "coming_from_pytorch.md": CodePage(needs=("torch",)),
    "adding_a_variant.md": CodePage(),
    "low_precision.md": CodePage(),
    "memory.md": CodePage(),
    "sharding.md": CodePage(own_test="test_zero1_example_runs_as_written"),
    "speed.md": CodePage(needs=("flax",)),
    "which_adam.md": CodePage(),
}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


# -- the API page ----------------------------------------------------------------------------


def _public_symbols() -> set[str]:
    """``docs/public_api.py``'s definition, read from its file (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("public_api", DOCS / "public_api.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.public_symbols()


_DIRECTIVE = re.compile(
    r"^\.\. (?:py:)?(currentmodule|module|automodule|autosummary|auto\w+)::\s*([^\s(]*)"
)


def _documented_symbols(rst: str) -> tuple[set[str], set[str]]:
    """``(entries, summaries)``: the dotted names of the page's autodoc directives
    (``autofunction``, ``autoclass``, ``automodule``...) and of its autosummary tables,
    resolved against ``.. currentmodule::`` as Sphinx resolves them."""
    entries: set[str] = set()
    summaries: set[str] = set()
    current = ""
    in_summary = False

    def qualified(name: str) -> str:
        return name if not current or name.startswith("adam_jax") else f"{current}.{name}"

    for line in rst.splitlines():
        match = _DIRECTIVE.match(line)
        if match:
            kind, target = match.groups()
            in_summary = kind == "autosummary"
            if kind in ("currentmodule", "module"):
                current = target
            elif kind == "automodule":
                current = target
                entries.add(target)
            elif not in_summary:
                entries.add(qualified(target))
            continue
        if in_summary:
            stripped = line.strip()
            if line and not line[0].isspace():
                in_summary = False
            elif stripped and not stripped.startswith(":"):
                summaries.add(qualified(stripped.lstrip("~")))
    return entries, summaries


def test_documented_symbols_parser_resolves_modules_and_summaries() -> None:
    rst = textwrap.dedent(
        """\
        .. currentmodule:: adam_jax

        .. autosummary::
           :nosignatures:

           adam

        .. autofunction:: adam
        .. automodule:: adam_jax.flat
        .. autoclass:: FlatLayout(treedef, slots, groups)
        .. currentmodule:: adam_jax
        .. autoclass:: adam_jax.FlatParams
        """
    )
    entries, summaries = _documented_symbols(rst)
    assert entries == {
        "adam_jax.adam",
        "adam_jax.flat",
        "adam_jax.flat.FlatLayout",
        "adam_jax.FlatParams",
    }
    assert summaries == {"adam_jax.adam"}


def test_api_page_documents_every_public_name() -> None:
    entries, _ = _documented_symbols(API_PAGE.read_text())
    missing = sorted(_public_symbols() - entries)
    assert not missing, f"public names without an entry in docs/api.rst: {missing}"


def test_api_page_documents_only_public_names() -> None:
    entries, summaries = _documented_symbols(API_PAGE.read_text())
    extra = sorted((entries | summaries) - _public_symbols())
    assert not extra, f"docs/api.rst documents names that adam_jax does not export: {extra}"


# -- the Sphinx build ------------------------------------------------------------------------


def _missing_docs_tools() -> list[str]:
    tools = ("sphinx", "myst_nb", "sphinx_book_theme")
    return [tool for tool in tools if importlib.util.find_spec(tool) is None]


def test_sphinx_build_passes_with_warnings_as_errors(tmp_path: Path) -> None:
    missing = _missing_docs_tools()
    if missing:
        message = f"docs tools not installed: {missing} (pip install -e '.[docs]')"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    command = [
        sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
        "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, f"sphinx build failed:\n{result.stdout}\n{result.stderr}"
    # The build's own lines, not myst's and myst-nb's whole parser configurations.
    assert "building [html]" in result.stdout and "ParserConfig(" not in result.stdout
    api_html = (tmp_path / "html" / "api.html").read_text()
    for name in sorted(_public_symbols()):
        is_module = isinstance(sys.modules.get(name), types.ModuleType)
        anchor = f'id="module-{name}"' if is_module else f'id="{name}"'
        assert anchor in api_html, f"{name} has no anchor in the built API page"
    assert (tmp_path / "html" / "mnist.html").exists()


# -- code on the pages -----------------------------------------------------------------------

_FENCE = re.compile(r"^```(\S*)[ \t]*([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def _include(argument: str, options: str, page: Path) -> str:
    """The text a MyST ``{include}`` directive inserts (its ``start-after`` and
    ``end-before`` options only)."""
    text = (page.parent / argument.strip()).read_text()
    for option in options.strip().splitlines():
        key, _, value = option.strip().partition(" ")
        value = value.strip().strip('"')
        if key == ":start-after:":
            text = text[text.index(value) + len(value) :]
        elif key == ":end-before:":
            text = text[: text.index(value)]
    return text


def _python_blocks(page: Path) -> list[str]:
    blocks = []
    for language, argument, body in _FENCE.findall(page.read_text()):
        if language == "{include}":
            included = _include(argument, body, page)
            blocks += [code for lang, _, code in _FENCE.findall(included) if lang == "python"]
        elif language == "python":
            blocks.append(body)
    return blocks


def test_python_blocks_follow_includes(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# A\n```python\nx = 1\n```\n# B\n```python\ny = 2\n```\n")
    (tmp_path / "page.md").write_text(
        '```{include} other.md\n:start-after: "# B"\n```\n\n```python\nz = 3\n```\n'
    )
    assert _python_blocks(tmp_path / "page.md") == ["y = 2\n", "z = 3\n"]


def test_every_page_with_code_runs() -> None:
    pages = {page.name for page in DOCS.glob("*.md") if _python_blocks(page)}
    assert pages <= set(CODE_PAGES), f"add to CODE_PAGES: {sorted(pages - set(CODE_PAGES))}"


@pytest.mark.parametrize("page", sorted(p for p in CODE_PAGES if not CODE_PAGES[p].own_test))
def test_page_code_runs(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for package in CODE_PAGES[page].needs:
        if importlib.util.find_spec(package.split(".")[0]) is None:
            pytest.skip(f"{page} needs {package}")
    blocks = _python_blocks(DOCS / page)
    assert blocks, f"docs/{page} has no python code blocks"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{Path(page).stem}"}
    exec(CODE_PAGES[page].prelude, namespace)
    for index, block in enumerate(blocks):
        # dont_inherit: the page runs as written, not under this module's __future__ imports.
        code = compile(block, f"docs/{page} [python block {index + 1}]", "exec", dont_inherit=True)
        exec(code, namespace)  # the page's own example code


README_BLOCKS = [code for lang, _, code in _FENCE.findall(README.read_text()) if lang == "python"]


@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_each_readme_block_runs_alone(index: int) -> None:
    """Each python block of README.md in a fresh namespace, as a reader pastes it alone."""
    name = f"README.md [python block {index + 1}]"
    exec(compile(README_BLOCKS[index], name, "exec", dont_inherit=True), {"__name__": "readme"})


def test_readme_commands_run_without_activating_the_environment() -> None:
    """The README's commands make ``.venv`` and never activate it: each command of the shell
    blocks of "The commands" and "Quick start" runs ``.venv/bin/python`` (a bare ``python``
    there finds no jax)."""
    sections = re.split(r"^## ", README.read_text(), flags=re.M)
    text = "".join(s for s in sections if s.startswith(("The commands\n", "Quick start\n")))
    blocks = [code for lang, _, code in _FENCE.findall(text) if lang == "bash"]
    commands = [part.split() for block in blocks for part in re.split(r"&&|\n", block)]
    programs = {command[0] for command in commands if command}
    assert programs <= {"python3", ".venv/bin/pip", ".venv/bin/python", "bash"}, programs
    assert ["python3", "-m", "venv", ".venv"] in commands


def test_language_model_page_links_read_on_github() -> None:
    """MyST's ``[](page.md)`` takes the page's title in Sphinx, but GitHub shows an empty
    link."""
    assert "[](" not in (REPO_ROOT / "docs" / "language_model.md").read_text()


def test_zero1_example_runs_as_written() -> None:
    """The ZeRO-1 example of docs/sharding.md, alone in a fresh interpreter (it sets up the 8
    CPU devices itself, before jax starts): each device keeps 1/8 of a moment, and of SOAP's
    factors and bases with ``block_axis``."""
    code = "\n".join(_python_blocks(DOCS / "sharding.md"))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "(64, 16) stored as (8, 16) per device\n8 devices share them\n"


# -- docstring conventions -------------------------------------------------------------------

_SECTION = re.compile(r"^(?P<indent>[ \t]*)(?P<title>[A-Z][A-Za-z ]*):{1,2}[ \t]*$", re.M)


def _section(docstring: str, titles: tuple[str, ...]) -> str | None:
    """The body of the first Google-style section of ``docstring`` titled one of ``titles``
    (the indented lines under ``Title:``), dedented; ``None`` if there is none."""
    lines = docstring.splitlines()
    for number, line in enumerate(lines):
        match = _SECTION.match(line)
        if not match or match.group("title") not in titles:
            continue
        depth = len(match.group("indent"))
        body = []
        for following in lines[number + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= depth:
                break
            body.append(following)
        return textwrap.dedent("\n".join(body))
    return None


def _public_callables() -> list[str]:
    return sorted(
        name
        for name in adam_jax.__all__
        if inspect.isfunction(getattr(adam_jax, name)) or inspect.isclass(getattr(adam_jax, name))
    )


def test_section_finds_an_indented_example() -> None:
    docstring = "Summary.\n\nArgs:\n  x: a value.\n\nExample:\n  >>> print(1)\n  1\n\nNotes:\n  n"
    assert _section(docstring, ("Example", "Examples")) == ">>> print(1)\n1\n"
    assert _section(docstring, ("References",)) is None


@pytest.mark.parametrize("name", _public_callables())
def test_docstring_example_shows_a_value(name: str) -> None:
    docstring = inspect.getdoc(getattr(adam_jax, name)) or ""
    example = _section(docstring, ("Example", "Examples"))
    if example is None:
        return
    shown = [step for step in doctest.DocTestParser().get_examples(example) if step.want.strip()]
    assert shown, (
        f"the Example of adam_jax.{name} shows no value: give at least one '>>>' line an "
        "expected output (a print or a check), which the doctests then verify"
    )


@pytest.mark.parametrize("name", ALIASES)
def test_alias_docstring_has_references(name: str) -> None:
    docstring = inspect.getdoc(getattr(adam_jax, name)) or ""
    references = _section(docstring, ("References",))
    assert references and references.strip(), f"adam_jax.{name} has no 'References:' section"
