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
    monkeypatch.setenv("MPLBACKEND", "Agg")
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
