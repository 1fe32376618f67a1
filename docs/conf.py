"""Sphinx configuration of the adam_jax documentation.

Build (about ten seconds; the notebook is rendered, not executed):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import logging as std_logging
import sys
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.util import logging

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS)]

from public_api import public_symbols  # noqa: E402

import adam_jax  # noqa: E402

project = "adam_jax"
author = "adam_jax developers"
copyright = "adam_jax developers"
release = adam_jax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",  # Markdown pages and the .ipynb notebook (myst-nb includes myst-parser)
]

root_doc = "index"
exclude_patterns = [
    "_build",
    "**.ipynb_checkpoints",
    "which_adam_mnist.md",
]

# -- autodoc / autosummary -------------------------------------------------------------------
# The API page lists every entry by hand (autosummary tables without :toctree:), so the build
# writes nothing into the source tree.
autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# Keep optax's type aliases readable instead of expanding them into long unions.
autodoc_type_aliases = {
    "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
    "optax.Schedule": "optax.Schedule",
    "optax.Params": "optax.Params",
    "optax.Updates": "optax.Updates",
    "optax.OptState": "optax.OptState",
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- MyST / myst-nb --------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 4  # GitHub-style anchors, for links to headings (speed.md#the-8-bit-step)
nb_execution_mode = "off"  # the MNIST notebook trains for minutes: render it, never run it

# -- HTML ------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"adam_jax {release}"
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}


# -- API coverage ----------------------------------------------------------------------------
# As optax's docs do: the build fails (a warning under -W) when a public symbol has no entry.


def _check_api_coverage(app: Sphinx, env) -> None:
    documented = set(env.get_domain("py").objects)
    missing = sorted(public_symbols() - documented)
    if missing:
        logging.getLogger(__name__).warning(
            "public symbols missing from docs/api.rst: %s", ", ".join(missing)
        )


class _WithoutParserConfigurations(std_logging.Filter):
    """Leaves out the lines in which myst and myst-nb print their whole parser configuration
    (hundreds of characters each, at every build)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return "ParserConfig(" not in record.getMessage()


def setup(app: Sphinx) -> dict[str, bool]:
    app.connect("env-check-consistency", _check_api_coverage)
    for handler in std_logging.getLogger("sphinx").handlers:
        handler.addFilter(_WithoutParserConfigurations())
    return {"parallel_read_safe": True}
