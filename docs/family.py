"""The lists of the family that readers see, generated from ``adam_jax.registry``.

Each list sits in its file between two marker lines (``family: NAME`` and ``end of family:
NAME`` in a comment; ``family list`` and ``end of family list`` in Markdown) and is rewritten
from the registry:

* ``adam_jax/__init__.py``: the imports of every optimizer, its moment estimate and its
  companions, and ``__all__`` (every public name the module imports);
* ``docs/api.rst``: the autosummary and autodoc entries of the optimizers and their moment
  estimates, and of the variants' states (with their fields);
* ``README.md`` and ``docs/index.md``: the names of the modern family;
* ``README.md``: the family table, a row per optimizer (its summary, paper and optax
  namesake).

``python docs/family.py`` rewrites them after a new optimizer's module is added to
``adam_jax/_src/variants/`` (the registry finds it); ``tests/test_registry.py`` fails while any
is stale.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# ``python docs/family.py`` in a checkout reads that checkout's registry, installed or not.
sys.path.insert(0, str(ROOT))


def _rows() -> tuple:
    from adam_jax import registry

    return registry.OPTIMIZERS


def _public_objects(row) -> list[tuple[str, object]]:
    """The names a row adds to ``adam_jax`` and their objects: the optimizer, its moment
    estimate and its companions (looked up in the optimizer's module, or the package of a
    variant written as one)."""
    import importlib

    from adam_jax._src.registry import declaring_module

    module = importlib.import_module(declaring_module(row.alias.__module__))
    named = [(row.name, row.alias)]
    if row.transformation is not None:
        named.append((row.transformation.__name__, row.transformation))
    named += [(name, getattr(module, name)) for name in row.companions]
    return named


def init_imports() -> str:
    """``from <module> import <names>`` lines for every row's public names (from the package of
    a variant written as one, which re-exports them)."""
    from adam_jax._src.registry import declaring_module

    by_module: dict[str, set[str]] = defaultdict(set)
    for row in _rows():
        for name, value in _public_objects(row):
            module = getattr(value, "__module__", row.alias.__module__)
            by_module[declaring_module(module)].add(name)
    lines = []
    for module in sorted(by_module):
        names = sorted(by_module[module])
        one_line = f"from {module} import {', '.join(names)}"
        if len(one_line) <= 100:
            lines.append(one_line)
        else:
            lines.append(f"from {module} import (\n" + "".join(f"    {n},\n" for n in names) + ")")
    return "\n".join(lines) + "\n"  # isort ends an import block with a blank line


def init_all(source: str) -> str:
    """``__all__``: every public name that ``adam_jax/__init__.py`` imports, sorted."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom | ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    public = sorted(n for n in names if not n.startswith("_") and n != "annotations")
    return "__all__ = [\n" + "".join(f'    "{n}",\n' for n in public) + "]"


def _autodoc(names: list[str]) -> str:
    summary = ".. autosummary::\n   :nosignatures:\n\n" + "".join(f"   {n}\n" for n in names)
    return summary + "\n" + "\n".join(f".. autofunction:: {n}" for n in names)


def api_adam() -> str:
    return _autodoc([row.name for row in _rows() if row.group == "adam"])


def api_variants() -> str:
    rows = [row for row in _rows() if row.group == "variant"]
    functions = [row.name for row in rows]
    for row in rows:  # the companion functions; state types are documented with the states
        functions += [
            name
            for name, value in _public_objects(row)[2 if row.transformation else 1 :]
            if not isinstance(value, type)
        ]
    return _autodoc(functions)


def api_moment_estimates() -> str:
    return _autodoc(
        [r.transformation.__name__ for r in _rows() if r.group == "variant" and r.transformation]
    )


def api_states() -> str:
    """The variants' state types (the companions that are classes), each with its fields."""
    states = [
        (name, value)
        for row in _rows()
        if row.group == "variant"
        for name, value in _public_objects(row)
        if isinstance(value, type)
    ]
    summary = ".. autosummary::\n   :nosignatures:\n\n" + "".join(f"   {n}\n" for n, _ in states)
    return summary + "\n" + "\n".join(
        f".. autoclass:: {name}({', '.join(value._fields)})" for name, value in states
    )


def family_names() -> str:
    """The modern family by name, as prose."""
    names = [f"`{row.name}`" for row in _rows() if row.group == "variant"]
    return ", ".join(names[:-1]) + f" and {names[-1]}"


def _citation(paper: Any) -> str:
    """``[First et al., Venue](url)``; two authors are named both."""
    names = re.split(r", | and ", paper.authors)
    who = paper.authors if len(names) <= 2 else f"{names[0]} et al."
    return f"[{who}, {paper.venue}]({paper.url})"


def family_table() -> str:
    """README's table of the family: one row per optimizer, in the registry's order."""
    lines = [
        "| optimizer | what it changes in Adam | paper | optax namesake |",
        "|---|---|---|---|",
    ]
    for row in _rows():
        namesake = f"`{row.optax_name}`" if row.optax_name else "—"
        lines.append(f"| `{row.name}` | {row.summary} | {_citation(row.paper)} | {namesake} |")
    return "\n".join(lines)


def _blocks() -> dict[str, tuple[str, str, dict[str, Callable[[str], str]]]]:
    """file -> (its start marker, its end marker, {block name: the block's text from the
    file's text})."""
    return {
        "adam_jax/__init__.py": (
            "# family: {}",
            "# end of family: {}",
            {"imports": lambda _: init_imports(), "__all__": init_all},
        ),
        "docs/api.rst": (
            ".. family: {}",
            ".. end of family: {}",
            {
                "adam": lambda _: api_adam(),
                "variants": lambda _: api_variants(),
                "moment estimates": lambda _: api_moment_estimates(),
                "states": lambda _: api_states(),
            },
        ),
        "README.md": (
            "<!-- family {} -->",
            "<!-- end of family {} -->",
            {"list": lambda _: family_names(), "table": lambda _: family_table()},
        ),
        "docs/index.md": (
            "<!-- family {} -->",
            "<!-- end of family {} -->",
            {"list": lambda _: family_names()},
        ),
    }


def render(path: str, text: str) -> str:
    """``text`` of the file ``path`` with each of its blocks rewritten."""
    start_marker, end_marker, blocks = _blocks()[path]
    for name, make in blocks.items():
        start, end = start_marker.format(name) + "\n", end_marker.format(name)
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise ValueError(f"{path} has no block {start.strip()!r} ... {end!r}")
        # The __all__ block reads the imports, which the block before may just have rewritten.
        text = pattern.sub(lambda _, s=start, e=end, m=make, t=text: f"{s}{m(t)}\n{e}", text)
    return text


def stale() -> list[str]:
    """The files whose blocks differ from the registry."""
    return [
        path
        for path in _blocks()
        if render(path, (ROOT / path).read_text()) != (ROOT / path).read_text()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only list the stale files")
    args = parser.parse_args()
    for path in _blocks():
        old = (ROOT / path).read_text()
        new = render(path, old)
        if new != old:
            print(("stale: " if args.check else "rewrote ") + path)
            if not args.check:
                (ROOT / path).write_text(new)
    if args.check and stale():
        raise SystemExit(1)


if __name__ == "__main__":
    main()
