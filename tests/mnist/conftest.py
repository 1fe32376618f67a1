"""Fixtures for the MNIST example's tests.

Tests that need the real MNIST files take the ``mnist_dir`` fixture: the directory named by
``$ADAM_JAX_DATA_DIR`` if set, else ``../shared/data/mnist`` beside the checkout, where
README.md's main command reads it; they are skipped, saying where they looked, when it does not
hold the four files. Everything else runs on synthetic data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mnist_helpers import find_real_mnist

from examples.mnist import data


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    directory, why_not = find_real_mnist(os.environ.get(data.ENV_DATA_DIR))
    if directory is None:
        pytest.skip(why_not)
    return directory


@pytest.fixture(scope="session")
def mnist(mnist_dir: Path) -> data.Dataset:
    return data.load("mnist", mnist_dir)
