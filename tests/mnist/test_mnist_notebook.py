"""Executes ``examples/mnist.ipynb`` on a small subset of MNIST, so that it never rots."""

from __future__ import annotations

from pathlib import Path

import pytest
from mnist_helpers import REPO_ROOT

from examples.mnist import data

NOTEBOOK = REPO_ROOT / "examples" / "mnist.ipynb"


@pytest.mark.slow
def test_notebook_runs(mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel inherits this process's environment. Its "python" command is replaced by
    # jupyter_client with sys.executable, so the kernel runs in this interpreter's environment.
    monkeypatch.setenv(data.ENV_DATA_DIR, str(mnist_dir))
    monkeypatch.setenv("ADAM_JAX_NOTEBOOK_TRAIN_LIMIT", "2048")
    monkeypatch.setenv("ADAM_JAX_NOTEBOOK_EPOCHS", "1")
    # The kernel's own backend (inline), as in Jupyter: the plotting cells must show figures.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    outputs = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert "Final test accuracy" in outputs
    accuracy = float(outputs.rsplit("test accuracy ", 1)[1].split("%")[0])
    assert accuracy > 80.0
    plotting = [cell for cell in notebook.cells if "plt.show()" in cell.source]
    assert len(plotting) == 3  # the digits, the learning curves, the predictions
    for cell in plotting:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(images) == 1, f"no figure from:\n{cell.source}"


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
