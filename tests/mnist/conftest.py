"""Fixtures for the MNIST example's tests.

Tests that need the real MNIST files take the ``mnist_dir`` fixture: the directory named by
``$ADAM_JAX_DATA_DIR`` (``.ci/run`` points it at ``../shared/data/mnist``); they are skipped
when it is unset or does not hold the four files. Everything else runs on synthetic data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from examples.mnist import data


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    env = os.environ.get(data.ENV_DATA_DIR)
    if not env:
        pytest.skip(f"${data.ENV_DATA_DIR} is not set: no real MNIST data")
    directory = Path(env)
    missing = [f.name for f in data.MNIST.files if not (directory / f.name).is_file()]
    if missing:
        pytest.skip(f"${data.ENV_DATA_DIR}={directory} lacks {missing}")
    return directory


@pytest.fixture(scope="session")
def mnist(mnist_dir: Path) -> data.Dataset:
    return data.load("mnist", mnist_dir)
