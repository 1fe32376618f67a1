"""Executes ``examples/optimizer_experiments.ipynb`` top to bottom in a fresh kernel."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mnist_helpers import (
    REPO_ROOT,
    assert_each_plotting_cell_shows_a_figure,
    execute_notebook,
    plotting_cells,
    text_outputs,
)

from examples.mnist import data

NOTEBOOK = REPO_ROOT / "examples" / "optimizer_experiments.ipynb"
# The sections that draw: paths, Reddi's problem, epsilon (two), warm-up, vanishing and
# exploding gradients, weight decay, the MNIST comparison.
FIGURES = 8


@pytest.mark.slow
def test_notebook_runs(mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = execute_notebook(NOTEBOOK, monkeypatch, **{data.ENV_DATA_DIR: str(mnist_dir)})
    assert len(plotting_cells(notebook)) == FIGURES
    assert_each_plotting_cell_shows_a_figure(notebook)
    text = text_outputs(notebook)
    # What the text of section 2 says: Adam ends at +1, AMSGrad and ADOPT at the optimum -1.
    ends = dict(re.findall(r"^(\w+) +x at the end ([+-][\d.]+)", text, flags=re.MULTILINE))
    assert sorted(ends) == ["ADOPT", "AMSGrad", "Adam", "SGD"]
    assert float(ends["Adam"]) > 0.99
    assert float(ends["AMSGrad"]) < -0.99 and float(ends["ADOPT"]) < -0.99


def test_notebook_is_stored_executed() -> None:
    """The docs page and GitHub show the stored outputs: every code cell ran, in order, and
    every figure is there."""
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert not [o for cell in code for o in cell.outputs if o.get("output_type") == "error"]
    figures = sum("image/png" in o.get("data", {}) for cell in code for o in cell.outputs)
    assert figures == FIGURES == len(plotting_cells(notebook))
