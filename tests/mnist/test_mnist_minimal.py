"""The one-file example, examples/mnist_minimal.py: short, adam_jax in plain view, its steps
learn, its options reach ``train``, and on the real data it reaches 99% test accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flax import nnx
from mnist_helpers import REPO_ROOT

import adam_jax
from examples import mnist_minimal

MAX_LINES = 150


def test_the_example_is_short_and_shows_the_adam_jax_optimizer() -> None:
    source = (REPO_ROOT / "examples" / "mnist_minimal.py").read_text()
    assert len(source.splitlines()) <= MAX_LINES, "the minimal example is read in one sitting"
    assert "nnx.Optimizer(model, adam_jax.adam(" in source
    assert "from examples.mnist import data" in source  # The shared loader, not another one.


def test_the_steps_learn_a_few_random_batches() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 32, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, (4, 32)).astype(np.int32)
    model = mnist_minimal.CNN(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, adam_jax.adam(3e-3), wrt=nnx.Param)
    model.train()
    losses = [
        float(mnist_minimal.train_step(model, optimizer, images[i % 4], labels[i % 4]))
        for i in range(12)
    ]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses  # Memorizes the 4 batches.
    model.eval()  # Batch norm by its running averages, which 12 steps have barely moved.
    predicted = np.argmax(model(images[0]), axis=-1)
    assert int(mnist_minimal.eval_step(model, images[0], labels[0])) == np.sum(
        predicted == labels[0]
    )


def test_the_options_reach_train(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(mnist_minimal, "train", lambda *args: calls.append(args))
    argv = ["--data-dir", "d", "--epochs", "2", "--batch-size", "64", "--learning-rate", "0.01"]
    mnist_minimal.main([*argv, "--seed", "3"])
    assert calls == [("d", 2, 64, 0.01, 3)]


@pytest.mark.slow
def test_the_example_reaches_99_percent_on_real_mnist(mnist_dir: Path) -> None:
    assert mnist_minimal.train(str(mnist_dir)) >= 0.99
