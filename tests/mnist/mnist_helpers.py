"""Helpers shared by the MNIST example's tests (imported by name: ``tests/mnist`` is on the
path of its own tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples.common import metrics
from examples.mnist import data

REPO_ROOT = Path(__file__).resolve().parents[2]
# Where README.md's main command reads MNIST (--data-dir ../shared/data/mnist).
BESIDE_THE_CHECKOUT = REPO_ROOT.parent / "shared" / "data" / "mnist"


def find_real_mnist(env: str | None, beside: Path = BESIDE_THE_CHECKOUT) -> tuple[Path | None, str]:
    """The folder of the real MNIST files for the tests: ``env`` (``$ADAM_JAX_DATA_DIR``) if
    set, else ``beside`` the checkout; ``(None, why not)`` where it lacks them."""
    directory = Path(env) if env else beside
    named_by = f"${data.ENV_DATA_DIR}" if env else f"${data.ENV_DATA_DIR} unset, so"
    if not directory.is_dir():
        return None, f"no real MNIST data: {named_by} {directory} is no folder"
    missing = [f.name for f in data.MNIST.files if not (directory / f.name).is_file()]
    if missing:
        return None, f"no real MNIST data: {named_by} {directory} lacks {', '.join(missing)}"
    return directory, ""


# Fields of metrics.jsonl records that measure time, and so differ between identical runs.
TIMING_FIELDS = ("seconds", "train_seconds", "images_per_second", "elapsed_seconds")


def synthetic_dataset(n_train: int = 512, n_test: int = 100, seed: int = 0) -> data.Dataset:
    """A learnable stand-in for MNIST: each class is a noisy copy of its own random template."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, (10, 28, 28))

    def split(n: int) -> data.Split:
        labels = rng.integers(0, 10, n).astype(np.int32)
        noise = rng.integers(-60, 61, (n, 28, 28))
        images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
        return data.Split(images, labels)

    return data.Dataset(train=split(n_train), test=split(n_test), spec=data.MNIST)


def with_white_images(dataset: data.Dataset, indices: np.ndarray) -> data.Dataset:
    """``dataset`` with the training images at ``indices`` all white: the marks that
    :class:`Poisoned` turns into a non-finite loss."""
    images = dataset.train.images.copy()
    images[indices] = 255
    return data.Dataset(data.Split(images, dataset.train.labels), dataset.test, dataset.spec)


class Tiny(nnx.Module):
    """A one-hidden-layer network with dropout: compiles in a moment, and its steps draw
    random numbers, which resumes must replay."""

    def __init__(self, *, rngs: nnx.Rngs, hidden: int = 16, param_dtype: Any = jnp.float32):
        self.dense1 = nnx.Linear(28 * 28, hidden, param_dtype=param_dtype, rngs=rngs)
        self.dense2 = nnx.Linear(hidden, 10, param_dtype=param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(0.2)

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x = nnx.relu(self.dense1(x.reshape(x.shape[0], -1)))
        return self.dense2(self.dropout(x, deterministic=not train, rngs=rngs))


class Poisoned(Tiny):
    """:class:`Tiny` with NaN logits for a batch that holds a white image (after
    normalization every pixel of it is about 2.8; no pixel of a synthetic image is)."""

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
        logits = super().__call__(x, train=train, rngs=rngs)
        white = jnp.any(jnp.min(x, axis=(1, 2, 3)) > 2.0)
        # A product, not jnp.where: its gradient is NaN as well.
        return logits * jnp.where(white, jnp.nan, 1.0)


def state_arrays(state: nnx.State) -> dict[str, Any]:
    """A trainer state as a nested dict of NumPy arrays."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def records_without_timing(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, less the fields that measure time."""
    return [
        {k: v for k, v in record.items() if k not in TIMING_FIELDS} for record in metrics.read(path)
    ]


def execute_notebook(path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> Any:
    """Runs the notebook at ``path`` top to bottom in a fresh kernel, with ``env`` set, and
    returns it with its new outputs.

    The kernel inherits this process's environment; jupyter_client replaces its "python"
    command by ``sys.executable``, so it runs in this interpreter's environment. It gets its
    own (inline) matplotlib backend, as in Jupyter.
    """
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    return notebook


def text_outputs(notebook: Any) -> str:
    """Everything the notebook's code cells printed, in order."""
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def plotting_cells(notebook: Any) -> list[Any]:
    """The cells that draw a figure (they end with ``plt.show()``)."""
    return [cell for cell in notebook.cells if "plt.show()" in cell.source]


def assert_each_plotting_cell_shows_a_figure(notebook: Any) -> None:
    for cell in plotting_cells(notebook):
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(images) == 1, f"no figure from:\n{cell.source}"
