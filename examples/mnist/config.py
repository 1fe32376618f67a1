"""Configuration of a training run, as code."""

from __future__ import annotations

import dataclasses

from examples.mnist import data, models, optimizers

# Settings that a resumed run must share with the checkpoint it resumes from: they fix the
# state's structure (model, optimizer, non-finite skipping) or which batches make up a step
# (dataset, train_limit, batch_size, seed). The others (epochs, learning rate, schedule,
# devices, shard_optimizer, ...) may change on resume; the run then follows the new values from
# the checkpoint on.
RESUME_SETTINGS = (
    "model",
    "optimizer",
    "batch_size",
    "dataset",
    "train_limit",
    "seed",
    "skip_nonfinite",
    "param_dtype",
    "low_precision",
)
# Storage of the params, and how updates reach low-precision ones (adam_jax.kahan_summation,
# adam_jax.stochastic_rounding; "none": rounded to nearest, where small updates vanish).
PARAM_DTYPES = ("float32", "bfloat16", "float16")
LOW_PRECISION = ("none", "kahan", "stochastic")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a run. The defaults are the tuned ``cnn`` recipe.

    ``learning_rate=None`` takes the optimizer's tuned peak rate from
    :data:`examples.mnist.optimizers.PEAK_LEARNING_RATES`. ``checkpoint_every=None``
    checkpoints at the end of each epoch. ``devices`` is the size of the data-parallel mesh
    over all processes (``None``: one device with one process, every device of every process
    with several; see :mod:`examples.mnist.parallel`); it may change on resume.
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
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    # Steps between training-loss records in metrics.jsonl (and progress-bar updates).
    log_every: int = 10
    # Skip steps whose gradient has a NaN or an Inf; stop after this many in a row.
    skip_nonfinite: bool = False
    max_consecutive_skips: int = 10
    # Data parallelism: every batch split over this many devices; with shard_optimizer the
    # optimizer state too (ZeRO-1).
    devices: int | None = None
    shard_optimizer: bool = False
    progress: bool = True
    # The params' dtype (the forward and backward passes compute in float32 either way) and
    # the treatment of their updates.
    param_dtype: str = "float32"
    low_precision: str = "none"

    def __post_init__(self) -> None:
        for name, choices in (
            ("model", tuple(models.MODELS)),
            ("optimizer", optimizers.NAMES),
            ("schedule", optimizers.SCHEDULES),
            ("dataset", tuple(data.DATASETS)),
            ("param_dtype", PARAM_DTYPES),
            ("low_precision", LOW_PRECISION),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}"
                )
        for name, value, lowest in (
            ("epochs", self.epochs, 1),
            ("batch_size", self.batch_size, 1),
            ("eval_batch_size", self.eval_batch_size, 1),
            ("max_shift", self.max_shift, 0),
            ("keep_checkpoints", self.keep_checkpoints, 1),
            ("log_every", self.log_every, 1),
            ("max_consecutive_skips", self.max_consecutive_skips, 1),
        ):
            if value < lowest:
                raise ValueError(f"{name} must be an integer >= {lowest}, got {value}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(
                f"checkpoint_every must be an integer >= 1 (or None: at epoch ends), "
                f"got {self.checkpoint_every}"
            )
        if self.devices is not None:
            if self.devices < 1:
                raise ValueError(f"devices must be an integer >= 1, got {self.devices}")
            check_batch_split(self.batch_size, self.devices)
        if self.train_limit is not None and self.train_limit < self.batch_size:
            raise ValueError(
                f"train_limit must be >= batch_size ({self.batch_size}) so that an epoch has a "
                f"step, got {self.train_limit}"
            )
        if not self.warmup_epochs >= 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.learning_rate is not None and not 0 < self.learning_rate < float("inf"):
            raise ValueError(f"learning_rate must be finite and > 0, got {self.learning_rate}")

    def resume_settings(self) -> dict[str, object]:
        """The settings a checkpoint records and a resumed run must match."""
        return {name: getattr(self, name) for name in RESUME_SETTINGS}


def check_batch_split(batch_size: int, devices: int) -> None:
    """Raises :class:`ValueError` unless ``devices`` devices can take equal shares of a batch."""
    if batch_size % devices:
        below = batch_size - batch_size % devices
        above = below + devices
        nearest = f"{below} or {above}" if below else str(above)
        raise ValueError(
            f"batch_size ({batch_size}) must be a multiple of the number of devices "
            f"({devices}), which take equal shares of each batch: for example {nearest}"
        )
