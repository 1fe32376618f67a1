"""Executes ``examples/mnist.ipynb`` on a small subset of MNIST, so that it never rots."""

from __future__ import annotations

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

NOTEBOOK = REPO_ROOT / "examples" / "mnist.ipynb"


@pytest.mark.slow
def test_notebook_runs(mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = execute_notebook(
        NOTEBOOK,
        monkeypatch,
        **{
            data.ENV_DATA_DIR: str(mnist_dir),
            "ADAM_JAX_NOTEBOOK_TRAIN_LIMIT": "2048",
            "ADAM_JAX_NOTEBOOK_EPOCHS": "1",
        },
    )
    outputs = text_outputs(notebook)
    assert "Final test accuracy" in outputs
    accuracy = float(outputs.rsplit("test accuracy ", 1)[1].split("%")[0])
    assert accuracy > 80.0
    assert len(plotting_cells(notebook)) == 3  # the digits, the learning curves, the predictions
    assert_each_plotting_cell_shows_a_figure(notebook)


def test_notebook_is_stored_executed() -> None:
    """The docs page shows the stored outputs (it does not run the notebook): every code cell
    ran, in order, and the figures are there."""
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert all(
        cell.outputs for cell in code if "plt.show()" in cell.source or "print(" in cell.source
    )
    figures = sum("image/png" in o.get("data", {}) for cell in code for o in cell.outputs)
    assert figures == 3
