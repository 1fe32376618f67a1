"""Configuration of a training run, as code."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a run. The defaults are the tuned ``cnn`` recipe.

    ``learning_rate=None`` takes the optimizer's tuned peak rate from
    :data:`examples.mnist.optimizers.PEAK_LEARNING_RATES`.
    """

    model: str = "cnn"
    optimizer: str = "adam"
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float | None = None
    schedule: str = "warmup_cosine"
    warmup_epochs: float = 0.5
    # Random shifts of up to this many pixels in each direction (0 disables augmentation).
    max_shift: int = 2
    seed: int = 0
    dataset: str = "mnist"
    data_dir: str | None = None
    train_limit: int | None = None
    eval_batch_size: int = 1000
    workdir: str = "runs/mnist"
    resume: bool = False
    checkpoints: bool = True
    progress: bool = True
