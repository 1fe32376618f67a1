"""Executes ``examples/optimizer_experiments.ipynb`` top to bottom in a fresh kernel."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mnist_helpers import REPO_ROOT

from examples.mnist import data

NOTEBOOK = REPO_ROOT / "examples" / "optimizer_experiments.ipynb"
# The sections that draw: paths, Reddi's problem, epsilon (two), warm-up, vanishing and
# exploding gradients, weight decay, the MNIST comparison.
FIGURES = 8


def _plotting_cells(notebook: object) -> list:
    return [cell for cell in notebook.cells if "plt.show()" in cell.source]  # type: ignore[attr-defined]


@pytest.mark.slow
def test_notebook_runs(mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel inherits this environment (and runs in this interpreter, see
    # test_mnist_notebook.py), with the kernel's own inline backend, as in Jupyter.
    monkeypatch.setenv(data.ENV_DATA_DIR, str(mnist_dir))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    plotting = _plotting_cells(notebook)
    assert len(plotting) == FIGURES
    for cell in plotting:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(images) == 1, f"no figure from:\n{cell.source}"
    text = "".join(
        o.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )
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
    assert figures == FIGURES == len(_plotting_cells(notebook))
