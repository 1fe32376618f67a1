"""The training program: CLI run on real data, bit-exact resume, comparison mode, pieces."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mnist_helpers import REPO_ROOT, synthetic_dataset

from examples.mnist import compare, data, main, models, optimizers, train
from examples.mnist.config import Config


@pytest.mark.slow
def test_cli_one_epoch_on_6000_real_images(mnist_dir: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    env = dict(os.environ, **{data.ENV_DATA_DIR: str(mnist_dir)})
    command = [sys.executable, "-m", "examples.mnist", "--epochs", "1", "--train-limit", "6000"]
    command += ["--batch-size", "32", "--workdir", str(workdir), "--no-progress"]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    records = train.read_metrics(workdir / "metrics.jsonl")
    assert len(records) == 1
    record = records[0]
    assert {"epoch", "train_loss", "test_loss", "test_accuracy", "seconds"} <= record.keys()
    assert record["epoch"] == 1
    assert record["test_accuracy"] >= 0.95, record
    assert (workdir / "curves.png").stat().st_size > 0
    assert (workdir / "checkpoints" / "1").is_dir()
    assert "Final test accuracy" in result.stdout


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    """An interrupted and resumed run ends with exactly the uninterrupted run's parameters.

    ``deep_cnn`` has batch statistics and dropout, the state that is easiest to get wrong.
    """
    dataset = synthetic_dataset(n_train=256, n_test=50)
    config = Config(
        model="deep_cnn",
        epochs=2,
        batch_size=64,
        eval_batch_size=32,
        workdir=str(tmp_path / "run"),
        progress=False,
    )
    trainer, history = train.train_and_evaluate(config, dataset)
    uninterrupted = trainer.params()
    full_state = jax.tree.map(np.asarray, nnx.to_pure_dict(trainer.state))

    # Interrupted in epoch 2: its checkpoint never got written.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "2")
    resumed_trainer, resumed = train.train_and_evaluate(
        dataclasses.replace(config, resume=True), dataset
    )
    jax.tree.map(np.testing.assert_array_equal, resumed_trainer.params(), uninterrupted)
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.tree.map(np.asarray, nnx.to_pure_dict(resumed_trainer.state)),
        full_state,
    )
    assert [m["epoch"] for m in resumed] == [1, 2]
    for before, after in zip(history, resumed, strict=True):
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert before[key] == after[key]
    assert len(train.read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2


def test_fresh_run_replaces_previous(tmp_path: Path) -> None:
    dataset = synthetic_dataset(n_train=128, n_test=20)
    config = Config(model="mlp", epochs=2, batch_size=64, workdir=str(tmp_path), progress=False)
    train.train_and_evaluate(config, dataset)
    _, history = train.train_and_evaluate(dataclasses.replace(config, epochs=1), dataset)
    assert len(history) == 1
    assert len(train.read_metrics(tmp_path / "metrics.jsonl")) == 1


def test_compare_writes_table_and_plot(tmp_path: Path) -> None:
    dataset = synthetic_dataset(n_train=256, n_test=100)
    config = Config(
        model="mlp",
        epochs=2,
        batch_size=64,
        workdir=str(tmp_path),
        checkpoints=False,
        progress=False,
    )
    results = compare.compare(config, ["adam", "sgd"], dataset)
    assert list(results) == ["adam", "sgd"]
    table = (tmp_path / "comparison.md").read_text()
    assert "| adam | 0.003 |" in table
    assert "| sgd | 0.1 |" in table
    assert "epochs to 99%" in table
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert (tmp_path / "adam" / "metrics.jsonl").exists()
    # Same initialization and data order: the first step's loss is the same for both.
    assert results["adam"][0]["epoch"] == results["sgd"][0]["epoch"] == 1


def test_same_initialization_and_order_across_optimizers() -> None:
    dataset = synthetic_dataset(n_train=256, n_test=10)
    a = train.Trainer(Config(model="cnn", optimizer="adam"), dataset)
    b = train.Trainer(Config(model="cnn", optimizer="momentum"), dataset)
    jax.tree.map(np.testing.assert_array_equal, a.params(), b.params())
    np.testing.assert_array_equal(a.epoch_order(3), b.epoch_order(3))
    assert not np.array_equal(a.epoch_order(3), a.epoch_order(4))


def test_learns_synthetic_data() -> None:
    config = Config(model="mlp", batch_size=64, epochs=2, max_shift=0)
    trainer = train.Trainer(config, synthetic_dataset())
    for epoch in range(2):
        trainer.train_epoch(epoch)
    assert trainer.evaluate()["test_accuracy"] > 0.9


def test_evaluation_masks_padding() -> None:
    """A test set that is not a whole number of eval batches gives the same figures."""
    dataset = synthetic_dataset(n_train=64, n_test=100)
    whole = train.Trainer(Config(model="mlp", batch_size=64, eval_batch_size=50), dataset)
    padded = train.Trainer(Config(model="mlp", batch_size=64, eval_batch_size=64), dataset)
    a, b = whole.evaluate(), padded.evaluate()
    assert a["test_accuracy"] == b["test_accuracy"]
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-6)


def test_random_shift_is_a_padded_crop() -> None:
    images = jax.random.uniform(jax.random.key(0), (16, 28, 28))
    shifted = np.asarray(train.random_shift(jax.random.key(1), images, 2))
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2)))
    offsets = set()
    for image, out in zip(padded, shifted, strict=True):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if np.allclose(out, image[dy : dy + 28, dx : dx + 28], atol=1e-6)
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 1
    assert train.random_shift(jax.random.key(1), images, 0) is images


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_models_give_logits(name: str) -> None:
    model = models.create(name, 0)
    x = jnp.zeros((3, 28, 28, 1))
    assert model(x).shape == (3, 10)
    assert model(x, train=True, rngs=nnx.Rngs(dropout=0)).shape == (3, 10)


@pytest.mark.parametrize("name", optimizers.NAMES)
def test_every_optimizer_steps(name: str) -> None:
    tx = optimizers.create(name, optimizers.schedule("warmup_cosine", 1e-2, 10, 2))
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    assert np.all(np.isfinite(updates["w"]))
    assert name in optimizers.PEAK_LEARNING_RATES


def test_adam_family_comes_from_adam_jax() -> None:
    import adam_jax

    for name in ("adam", "adamw", "nadam", "amsgrad", "adamax"):
        assert optimizers._FACTORIES[name] is getattr(adam_jax, name)


@pytest.mark.parametrize("name", optimizers.SCHEDULES)
def test_schedules(name: str) -> None:
    schedule = optimizers.schedule(name, 1.0, total_steps=100, warmup_steps=10)
    if name == "constant":
        assert float(schedule(0)) == float(schedule(99)) == 1.0
        return
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-6)


def test_cli_arguments() -> None:
    config, compared = main.parse_args(["--compare", "adam,sgd", "--train-limit", "300"])
    assert compared == ["adam", "sgd"]
    assert config.train_limit == 300
    assert main.parse_args([]) == (Config(), None)
    with pytest.raises(SystemExit):
        main.parse_args(["--compare", "adam,lion"])


def test_cli_reports_data_errors(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="train-images-idx3-ubyte.gz: not a complete gzip"):
        main.main(["--data-dir", str(tmp_path)])


def test_metrics_are_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"epoch": 1}) + "\n\n" + json.dumps({"epoch": 2}) + "\n")
    assert train.read_metrics(path) == [{"epoch": 1}, {"epoch": 2}]
    assert train.read_metrics(tmp_path / "absent.jsonl") == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be an integer >= 1, got 0"),
        ("batch_size", -1, "batch_size must be an integer >= 1, got -1"),
        ("eval_batch_size", 0, "eval_batch_size must be an integer >= 1, got 0"),
        ("max_shift", -2, "max_shift must be an integer >= 0, got -2"),
        ("train_limit", 100, "train_limit must be >= batch_size (128)"),
        ("warmup_epochs", -0.5, "warmup_epochs must be >= 0, got -0.5"),
        ("learning_rate", float("nan"), "learning_rate must be finite and > 0, got nan"),
        ("learning_rate", -1e-3, "learning_rate must be finite and > 0, got -0.001"),
    ],
)
def test_config_rejects_bad_values(field: str, value: float, message: str) -> None:
    """A bad setting fails before any work, naming the setting, the value and the range."""
    with pytest.raises(ValueError, match=re.escape(message)):
        Config(**{field: value})


def test_cli_reports_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(["--epochs", "0"])
    assert exit_info.value.code == 2
    assert "epochs must be an integer >= 1, got 0" in capsys.readouterr().err
