"""Configuration of a training run, as code."""

from __future__ import annotations

import dataclasses
from typing import Any

from examples.mnist import data, models, optimizers

# Settings that a resumed run must share with the checkpoint it resumes from: they fix the
# state's structure (model, optimizer, storage of params and moments, non-finite skipping) or
# which batches make up a step (dataset, train_limit, batch_size, seed). The others (epochs,
# learning rate, schedule, devices, shard_optimizer, ...) may change on resume; the run then
# follows the new values from the checkpoint on.
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
    "moments",
    "second_moment",
)
# Storage of the params, and how updates reach low-precision ones (adam_jax.kahan_summation,
# adam_jax.stochastic_rounding; "none": rounded to nearest, where small updates vanish).
PARAM_DTYPES = ("float32", "bfloat16", "float16")
LOW_PRECISION = ("none", "kahan", "stochastic")
# The params in one buffer per dtype (adam_jax.flat.FlatModel): "auto" packs them on a GPU or
# TPU, whose host handles every buffer of a step's call (examples.mnist.step.packs_params).
FLAT_PARAMS = ("auto", "on", "off")


def option(default: Any, help: str, **argparse: Any) -> Any:
    """A setting that is also a command-line option: ``--name-with-dashes``, with ``help``
    and argparse's other keywords (``choices``, ``metavar``). A ``bool`` setting is a switch
    to the other value: ``--name`` when it is off by default, ``--no-name`` when it is on
    (:func:`examples.mnist.main.add_options` builds them)."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a run. The defaults are the tuned ``cnn`` recipe.

    ``learning_rate=None`` takes the optimizer's tuned peak rate from
    :data:`examples.mnist.optimizers.PEAK_LEARNING_RATES`. ``checkpoint_every=None``
    checkpoints at the end of each epoch. ``devices`` is the size of the data-parallel mesh
    over all processes (``None``: one device with one process, every device of every process
    with several; see :mod:`examples.mnist.parallel`); it may change on resume.

    Every setting but ``checkpoints`` is an option of ``python -m examples.mnist``, in this
    order in ``--help``: an :func:`option`, or for ``devices`` one of
    :mod:`examples.common.distributed`.
    """

    model: str = option("cnn", "network", choices=sorted(models.MODELS))
    optimizer: str = option(
        "adam", "Adam family from adam_jax, baselines from optax", choices=optimizers.NAMES
    )
    epochs: int = option(5, "epochs to train")
    batch_size: int = option(128, "batch size")
    learning_rate: float | None = option(
        None, "peak learning rate (None: the optimizer's tuned rate)"
    )
    schedule: str = option("warmup_cosine", "learning-rate schedule", choices=optimizers.SCHEDULES)
    warmup_epochs: float = option(0.5, "linear warmup length")
    max_shift: int = option(2, "augmentation: random shifts of up to this many pixels (0: none)")
    seed: int = option(0, "initialization, data order, augmentation")
    dataset: str = option("mnist", "dataset", choices=sorted(data.DATASETS))
    data_dir: str | None = option(
        None,
        f"the folder holding the four files (None: ${data.ENV_DATA_DIR}, then "
        "~/.cache/adam_jax/<dataset>, downloading there)",
    )
    train_limit: int | None = option(
        None, "train on the first N images (None: all of them)", metavar="N"
    )
    eval_batch_size: int = option(1000, "batch size of the evaluation on the full test set")
    workdir: str = option("runs/mnist", "metrics, checkpoints and plots go here")
    resume: bool = option(
        False,
        "continue from the newest intact checkpoint in --workdir: what a run does without "
        "--restart (a requeued job's same command continues)",
    )
    restart: bool = option(
        False,
        "start over, although --workdir holds checkpoints; the previous run's files stay until "
        "this run's first checkpoint",
    )
    # Not an option: runs without checkpoints are for tests and notebooks.
    checkpoints: bool = True
    checkpoint_every: int | None = option(
        None,
        "checkpoint every STEPS optimizer steps (None: at the end of each epoch)",
        metavar="STEPS",
    )
    keep_checkpoints: int = option(3, "how many of the newest checkpoints to keep")
    # Also the steps between updates of the progress bar.
    log_every: int = option(
        10, "steps between training-loss records in metrics.jsonl", metavar="STEPS"
    )
    skip_nonfinite: bool = option(
        False, "skip steps whose gradient has a NaN or an Inf (optax.apply_if_finite)"
    )
    max_consecutive_skips: int = option(
        10, "with --skip-nonfinite: stop after this many skipped steps in a row"
    )
    # Its option, --devices, is examples.common.distributed's, which reads it before JAX starts
    # (importing this module starts JAX).
    devices: int | None = None
    param_dtype: str = option(
        "float32",
        "storage of the params (the passes compute in float32 either way)",
        choices=PARAM_DTYPES,
    )
    low_precision: str = option(
        "none",
        "updates of bfloat16/float16 params: Kahan summation, stochastic rounding, or "
        "rounded to nearest (none)",
        choices=LOW_PRECISION,
    )
    moments: str = option(
        "default",
        "storage of the optimizer's moments: the optimizer's own (default: adam_jax's in the "
        "params' dtype), or 8-bit or 4-bit codes with scales (adam_jax.eight_bit_moments, "
        "adam_jax.four_bit_moments)",
        choices=tuple(optimizers.MOMENTS),
    )
    second_moment: str = option(
        "default",
        "storage of the second moment: as --moments says (default), or factored into row and "
        "column means (adam_jax.factored_second_moment)",
        choices=tuple(optimizers.SECOND_MOMENTS),
    )
    shard_optimizer: bool = option(
        False, "split the optimizer state over the devices instead of replicating it (ZeRO-1)"
    )
    offload_state: bool = option(
        False,
        "keep the optimizer state in host memory between steps (adam_jax.offload_state)",
    )
    flat_params: str = option(
        "auto",
        "the params in one buffer per dtype (adam_jax.flat.FlatModel): one buffer for the "
        "host to hand each step instead of one per param; auto: on a GPU or TPU, with an "
        "optimizer that steps packed params",
        choices=FLAT_PARAMS,
    )
    progress: bool = option(True, "no progress bar")

    def __post_init__(self) -> None:
        for name, choices in (
            ("model", tuple(models.MODELS)),
            ("optimizer", optimizers.NAMES),
            ("schedule", optimizers.SCHEDULES),
            ("dataset", tuple(data.DATASETS)),
            ("param_dtype", PARAM_DTYPES),
            ("low_precision", LOW_PRECISION),
            ("moments", tuple(optimizers.MOMENTS)),
            ("second_moment", tuple(optimizers.SECOND_MOMENTS)),
            ("flat_params", FLAT_PARAMS),
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
        if self.resume and self.restart:
            raise ValueError("resume and restart: choose one")
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
        # Raises ValueError for moments or second_moment that store none of the optimizer's.
        optimizers.moment_storages(self.optimizer, self.moments, self.second_moment)

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
