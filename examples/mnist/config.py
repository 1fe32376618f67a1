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

    def __post_init__(self) -> None:
        for name, value, lowest in (
            ("epochs", self.epochs, 1),
            ("batch_size", self.batch_size, 1),
            ("eval_batch_size", self.eval_batch_size, 1),
            ("max_shift", self.max_shift, 0),
        ):
            if value < lowest:
                raise ValueError(f"{name} must be an integer >= {lowest}, got {value}")
        if self.train_limit is not None and self.train_limit < self.batch_size:
            raise ValueError(
                f"train_limit must be >= batch_size ({self.batch_size}) so that an epoch has a "
                f"step, got {self.train_limit}"
            )
        if not self.warmup_epochs >= 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.learning_rate is not None and not 0 < self.learning_rate < float("inf"):
            raise ValueError(f"learning_rate must be finite and > 0, got {self.learning_rate}")
