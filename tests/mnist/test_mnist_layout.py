"""The example as a teaching program: the reader's module comes first and is short, and each
setting is written once, in ``Config``, which makes the command line."""

from __future__ import annotations

import argparse
import dataclasses

from mnist_helpers import REPO_ROOT

from examples.mnist import main
from examples.mnist.config import Config

FIRST_SCREEN = 60  # lines


def test_the_first_screen_shows_the_model_the_optimizer_and_the_train_step() -> None:
    lines = (REPO_ROOT / "examples" / "mnist" / "step.py").read_text().splitlines()
    first_screen = "\n".join(lines[:FIRST_SCREEN])
    for shown in (
        "models.create(",
        "adam_jax.adam(learning_rate, **storages)",
        "optimizers.create(",
        "nnx.Optimizer(model, tx, wrt=nnx.Param)",
        "def loss_fn(",
        "def train_step(",
        "nnx.value_and_grad(loss_fn",
        "optimizer.update(model, grads)",
    ):
        assert shown in first_screen, shown
    assert "def eval_step(" in "\n".join(lines)
    assert len(lines) <= FIRST_SCREEN + 20, "step.py is the short module a reader starts with"


def test_every_setting_but_checkpoints_is_an_option() -> None:
    """A Config unlike the default in every setting that has an option comes back whole from
    its command line."""
    argv = [
        *("--model", "mlp", "--optimizer", "adamw", "--epochs", "2", "--batch-size", "64"),
        *("--learning-rate", "0.01", "--schedule", "constant", "--warmup-epochs", "0.25"),
        *("--max-shift", "1", "--seed", "3", "--dataset", "fashion_mnist", "--data-dir", "d"),
        *("--train-limit", "640", "--eval-batch-size", "50", "--workdir", "w", "--resume"),
        *("--checkpoint-every", "7", "--keep-checkpoints", "2", "--log-every", "5"),
        *("--skip-nonfinite", "--max-consecutive-skips", "4", "--devices", "2"),
        *("--param-dtype", "bfloat16", "--low-precision", "kahan", "--moments", "8bit"),
        "--shard-optimizer",
        "--offload-state",
        *("--flat-params", "on"),
        "--no-progress",
    ]
    config, _ = main.parse_args(argv)
    default = Config()
    unchanged = [
        f.name
        for f in dataclasses.fields(Config)
        if getattr(config, f.name) == getattr(default, f.name)
    ]
    # --second-moment factored does not go with --shard-optimizer (Config says why), nor
    # --restart with --resume.
    assert unchanged == ["restart", "checkpoints", "second_moment"]
    assert config == Config(
        model="mlp", optimizer="adamw", epochs=2, batch_size=64, learning_rate=0.01,
        schedule="constant", warmup_epochs=0.25, max_shift=1, seed=3, dataset="fashion_mnist",
        data_dir="d", train_limit=640, eval_batch_size=50, workdir="w", resume=True,
        checkpoint_every=7, keep_checkpoints=2, log_every=5, skip_nonfinite=True,
        max_consecutive_skips=4, devices=2, param_dtype="bfloat16", low_precision="kahan",
        moments="8bit", shard_optimizer=True, offload_state=True, flat_params="on",
        progress=False,
    )  # fmt: skip


def test_the_options_take_their_help_and_choices_from_config() -> None:
    parser = argparse.ArgumentParser()
    main.add_options(parser)
    shown = " ".join(parser.format_help().split())  # Without argparse's line breaks.
    for field in dataclasses.fields(Config):
        if field.metadata:
            assert " ".join(field.metadata["help"].split()) in shown
            if "choices" in field.metadata:
                assert "{" + ",".join(field.metadata["choices"]) + "}" in shown
