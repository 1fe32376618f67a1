"""Data parallelism in one process, on the 8 host devices that conftest.py asks XLA for: the
train step on a mesh of 8 matches the one-device step (``Explicit`` and ``Auto`` axes, with
and without ZeRO-1), checkpoints resume exactly and in any layout, and what cannot work is
refused with a message. (Several processes: ``test_processes.py``.)"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from mnist_helpers import Tiny, records_without_timing, state_arrays, synthetic_dataset

from examples.common import launch
from examples.common.errors import DeviceError
from examples.mnist import main, models, parallel, scaling, train
from examples.mnist.config import Config

DEVICES = 8
if jax.device_count() < DEVICES:
    pytest.skip(
        "needs 8 host devices (XLA_FLAGS set in tests/conftest.py before jax is imported)",
        allow_module_level=True,
    )

DATASET = synthetic_dataset(n_train=256, n_test=50)
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
# An epoch of 4 steps; momentum is linear in the gradients, so that the rounding differences
# of sums done in another order stay rounding differences (Adam divides a gradient by its own
# magnitude, which magnifies them where a gradient is close to 0). Evaluation batches of 20:
# rounded up to 24 on 8 devices, with more padding than on one.
CONFIG = Config(
    model="cnn", optimizer="momentum", batch_size=64, eval_batch_size=20, progress=False
)


@pytest.fixture(scope="module", autouse=True)
def _tiny_model() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.MODELS, "tiny", Tiny)
        yield


def trained_epoch(config: Config, mesh: Any = None) -> tuple[train.Trainer, dict[str, Any]]:
    """A trainer after one epoch, and the epoch's training and test figures."""
    trainer = train.Trainer(config, DATASET, mesh)
    figures = trainer.train_epoch(0) | trainer.evaluate()
    return trainer, figures


def assert_within_rounding(actual: Any, expected: Any, ulps: int = 8) -> None:
    """Each array of ``actual`` within ``ulps`` float32 units in the last place of the largest
    magnitude in its counterpart of ``expected``: what sums done in another order change."""

    def check(a: np.ndarray, e: np.ndarray) -> None:
        bound = ulps * np.spacing(np.max(np.abs(e)).astype(np.float32))
        np.testing.assert_allclose(a, e, rtol=0, atol=bound)

    jax.tree.map(check, actual, expected)


@pytest.fixture(scope="module")
def one_device() -> tuple[train.Trainer, dict[str, Any]]:
    return trained_epoch(CONFIG)


def _opt_state_leaves(trainer: train.Trainer) -> list[jax.Array]:
    return jax.tree.leaves(nnx.to_pure_dict(trainer.state)[1]["opt_state"])


@pytest.mark.parametrize("shard_optimizer", [False, True], ids=["replicated", "zero1"])
@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_steps_on_8_devices_match_one_device(
    one_device: tuple[train.Trainer, dict[str, Any]], axis_type: str, shard_optimizer: bool
) -> None:
    config = dataclasses.replace(CONFIG, devices=DEVICES, shard_optimizer=shard_optimizer)
    trainer, figures = trained_epoch(config, parallel.data_mesh(DEVICES, AXIS_TYPES[axis_type]))
    reference, expected = one_device
    assert_within_rounding(trainer.params(), reference.params())
    assert_within_rounding(state_arrays(trainer.state), state_arrays(reference.state))
    for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert figures[name] == pytest.approx(expected[name], rel=1e-6), name
    # The params are whole on every device; with ZeRO-1 each device holds 1/8 of every
    # momentum array that has a dimension 8 divides, all of the others.
    assert all(p.sharding.is_fully_replicated for p in jax.tree.leaves(trainer.state[0]))
    for leaf in _opt_state_leaves(trainer):
        shard = leaf.sharding.shard_shape(leaf.shape)
        divisible = any(size % DEVICES == 0 for size in leaf.shape)
        parts = DEVICES if shard_optimizer and divisible else 1
        assert np.prod(shard) * parts == leaf.size, (leaf.shape, shard)


class NormNet(nnx.Module):
    """deep_cnn's layers in small: convolution, batch norm, max pooling, dropout."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 8, kernel_size=(3, 3), use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.5)
        self.dense = nnx.Linear(14 * 14 * 8, 10, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x = nnx.relu(self.norm(self.conv(x), use_running_average=not train))
        x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
        return self.dense(self.dropout(x, deterministic=not train, rngs=rngs))


def test_batch_norm_and_dropout_see_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch norm normalizes by the statistics of the whole batch, and the dropout masks and
    shifts are drawn for the whole batch, on any number of devices: on 8 devices the loss of
    each step is the one-device loss up to rounding (statistics of each device's 8 images,
    or other masks, would change it in the second digit). The params are not compared: where
    a rounding difference moves a max-pooling winner or a ReLU input across 0, a gradient
    changes by more than rounding."""
    monkeypatch.setitem(models.MODELS, "norm_net", NormNet)
    config = dataclasses.replace(CONFIG, model="norm_net")
    losses = []
    for devices in (1, DEVICES):
        trainer = train.Trainer(dataclasses.replace(config, devices=devices), DATASET)
        order = trainer.epoch_order_on_devices(0)
        sums = []
        for i in range(3):
            trainer.step(order[i], i)
            sums.append(float(trainer.running["loss_sum"]))
        losses.append(np.diff(sums, prepend=0.0))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)


def test_zero1_gives_the_replicated_run_bit_for_bit() -> None:
    """Adam with --skip-nonfinite under Explicit axes: optax.apply_if_finite's lax.cond
    chooses between an update sliced like the moments and zeros like the gradient, which the
    step reconciles. Slicing the state changes where the update is computed, not what."""
    config = Config(
        model="tiny", batch_size=64, devices=DEVICES, skip_nonfinite=True, progress=False
    )
    replicated, _ = trained_epoch(config)
    sliced, _ = trained_epoch(dataclasses.replace(config, shard_optimizer=True))
    jax.tree.map(
        np.testing.assert_array_equal, state_arrays(sliced.state), state_arrays(replicated.state)
    )
    assert any(not leaf.sharding.is_fully_replicated for leaf in _opt_state_leaves(sliced))


def test_a_long_epoch_of_small_steps_on_8_devices_does_not_hang() -> None:
    """256 MLP steps dispatched at once made XLA:CPU deadlock in the all-reduce of a step
    (jax 0.10.2, 8 host devices on 2 cores: the process aborts after 40 s); the trainer keeps
    at most train.MAX_IN_FLIGHT steps queued."""
    config = Config(model="mlp", batch_size=8, devices=DEVICES, progress=False)
    trainer = train.Trainer(config, synthetic_dataset(n_train=2048, n_test=10))
    assert trainer.steps_per_epoch == 256
    figures = trainer.train_epoch(0)
    assert np.isfinite(figures["train_loss"])


def test_checkpoints_resume_exactly_and_in_any_layout(tmp_path: Path) -> None:
    """A ZeRO-1 run on 8 devices (an epoch of 8 steps), stopped after step 6, resumes
    bit-identical; its final checkpoint restores bit for bit on one device (where the arrays'
    sha256, written from slices, is checked against the whole arrays)."""
    workdir = tmp_path / "run"
    config = Config(
        model="tiny", epochs=1, batch_size=32, devices=DEVICES, shard_optimizer=True,
        checkpoint_every=3, log_every=2, workdir=str(workdir), progress=False,
    )  # fmt: skip
    trainer, _ = train.train_and_evaluate(config, DATASET)
    final = state_arrays(trainer.state)
    records = records_without_timing(workdir / "metrics.jsonl")

    interrupted = tmp_path / "interrupted"
    shutil.copytree(workdir, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "8")
    resumed, _ = train.train_and_evaluate(
        dataclasses.replace(config, workdir=str(interrupted), resume=True), DATASET
    )
    jax.tree.map(np.testing.assert_array_equal, state_arrays(resumed.state), final)
    assert records_without_timing(interrupted / "metrics.jsonl") == records

    one_device = dataclasses.replace(config, devices=1, shard_optimizer=False, resume=True)
    restored, _ = train.train_and_evaluate(one_device, DATASET)
    assert restored.layout.devices == 1
    jax.tree.map(np.testing.assert_array_equal, state_arrays(restored.state), final)
    assert records_without_timing(workdir / "metrics.jsonl") == records


def test_batch_that_the_devices_cannot_share_is_refused() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "batch_size (100) must be a multiple of the number of devices (8), which take "
            "equal shares of each batch: for example 96 or 104"
        ),
    ):
        Config(batch_size=100, devices=8)
    with pytest.raises(ValueError, match=re.escape("(3), which take equal shares of each batch")):
        Config(batch_size=2, devices=3)
    with pytest.raises(DeviceError, match=re.escape("batch_size (100) must be a multiple")):
        train.Trainer(Config(batch_size=100), DATASET, parallel.data_mesh(DEVICES))


def test_more_devices_than_there_are_is_refused() -> None:
    with pytest.raises(
        DeviceError,
        match=re.escape(
            "--devices 16 needs 16 devices, but there are 8 (cpu): choose --devices from 1 to 8"
        ),
    ):
        train.Trainer(Config(devices=16), DATASET)


def test_cli_reports_missing_devices(mnist_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--data-dir", str(mnist_dir), "--devices", "16", "--no-progress"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith(
        "error: --devices 16 needs 16 devices, but there are 8 (cpu): choose --devices from "
        "1 to 8 (XLA_FLAGS="
    )


def test_cli_refuses_process_options_that_do_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in [
        (["--devices", "0"], "--devices must be an integer >= 1, got 0"),
        (["--num-processes", "0"], "--num-processes must be an integer >= 1, got 0"),
        (["--num-processes", "2"], "--coordinator HOST:PORT is required with --num-processes 2"),
        (
            ["--num-processes", "2", "--process-id", "2", "--coordinator", "127.0.0.1:1234"],
            "--process-id must be in [0, 1] with --num-processes 2, got 2",
        ),
        (
            ["--num-processes", "4", "--devices", "6", "--coordinator", "127.0.0.1:1234"],
            "--devices 6 must be a multiple of --num-processes 4",
        ),
        (["--devices", "3"], "batch_size (128) must be a multiple of the number of devices (3)"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_cli_run_as_one_of_several_processes_must_be_started_as_such(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """main() in a program that did not join the other processes (python -m examples.mnist
    does, before JAX starts) says so rather than training alone."""
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--num-processes", "2", "--coordinator", "127.0.0.1:1234"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        "process 0: error: --num-processes 2, but this program is one of 1 processes: start "
        "each with python -m examples.mnist (or all with python -m examples.mnist.launch)\n"
    )


def test_resume_command_of_several_processes_starts_them_all() -> None:
    argv = ["--num-processes", "2", "--process-id", "1", "--coordinator=127.0.0.1:5", "--devices"]
    assert main.resume_command([*argv, "8", "--epochs", "3"], num_processes=2) == (
        f"{launch.interpreter()} -m examples.mnist.launch --num-processes 2 --devices 8 "
        "--epochs 3 --resume"
    )


def test_scaling_times_one_device_against_8(
    mnist_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", "tiny", "--batch-size", "64", "--train-limit", "256", "--rounds", "2"]
    scaling.main([*argv, "--data-dir", str(mnist_dir)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["round 1", "round 2"]
    assert "model tiny, batch 64, 256 images per epoch" in lines[2]
    names = ["1 device", "8 devices", "8 devices, ZeRO-1"]
    assert [line.split(":")[0] for line in lines[3:]] == [
        f"median seconds per epoch, {name}" for name in names
    ]
    assert lines[3].endswith("(1.00x)")
    with pytest.raises(SystemExit):
        scaling.parse_args(["--devices", "1"])
