"""Helpers shared by the MNIST example's tests (imported by name: ``tests/mnist`` is on the
path of its own tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from examples.mnist import data

REPO_ROOT = Path(__file__).resolve().parents[2]


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
