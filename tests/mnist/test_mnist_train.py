"""The training program: CLI run on real data, bit-exact resume, comparison mode, pieces."""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mnist_helpers import (
    REPO_ROOT,
    Tiny,
    records_without_timing,
    state_arrays,
    synthetic_dataset,
)

from examples.common import launch, metrics
from examples.common.checkpoints import SettingsMismatch
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
    records = metrics.read(workdir / "metrics.jsonl")
    epochs = [m for m in records if m["kind"] == "epoch"]
    assert len(epochs) == 1
    record = epochs[0]
    assert {"epoch", "train_loss", "test_loss", "test_accuracy", "seconds"} <= record.keys()
    assert record["epoch"] == 1
    assert record["step"] == 6000 // 32
    assert record["test_accuracy"] >= 0.95, record
    # A training-loss record every 10 steps, and one at the end of the epoch.
    steps = [m["step"] for m in records if m["kind"] == "step"]
    assert steps == [*range(10, 187, 10), 187]
    assert (workdir / "curves.png").stat().st_size > 0
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["187"]
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
    full_state = state_arrays(trainer.state)
    records = records_without_timing(tmp_path / "run" / "metrics.jsonl")

    # Interrupted in epoch 2 (of 4 steps): the checkpoint of step 8 never got written.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["4", "8"]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "8")
    resumed_trainer, resumed = train.train_and_evaluate(
        dataclasses.replace(config, resume=True), dataset
    )
    jax.tree.map(np.testing.assert_array_equal, resumed_trainer.params(), uninterrupted)
    jax.tree.map(np.testing.assert_array_equal, state_arrays(resumed_trainer.state), full_state)
    assert [m["epoch"] for m in resumed] == [1, 2]
    for before, after in zip(history, resumed, strict=True):
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert before[key] == after[key]
    assert records_without_timing(tmp_path / "run" / "metrics.jsonl") == records


@pytest.mark.parametrize("low_precision", ["kahan", "stochastic"])
def test_bfloat16_params_resume_exactly_with_the_buffer_and_key(
    tmp_path: Path, low_precision: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """bfloat16 params with Kahan summation or stochastic rounding: the params stay bfloat16,
    the checkpoint holds the compensation buffer or the key, and a resume from it gives the
    uninterrupted run's params and state bit for bit."""
    dataset = synthetic_dataset(n_train=256, n_test=50)
    config = Config(
        model="mlp",
        epochs=2,
        batch_size=64,
        workdir=str(tmp_path / "run"),
        progress=False,
        param_dtype="bfloat16",
        low_precision=low_precision,
    )
    trainer, _ = train.train_and_evaluate(config, dataset)
    state_bytes = "6.00 optimizer state = 8.00" if low_precision == "kahan" else "4.00"
    expected = f"(bfloat16, {low_precision}), bytes per parameter: 2.00 params + {state_bytes}"
    assert expected in capsys.readouterr().out
    uninterrupted, full_state = trainer.params(), state_arrays(trainer.state)
    assert {leaf.dtype for leaf in jax.tree.leaves(uninterrupted)} == {jnp.dtype(jnp.bfloat16)}
    paths = [
        jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(trainer.state)
    ]
    held = "compensation" if low_precision == "kahan" else "'key'"
    assert any("opt_state" in path and held in path for path in paths)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "8")
    resumed, _ = train.train_and_evaluate(dataclasses.replace(config, resume=True), dataset)
    jax.tree.map(np.testing.assert_array_equal, resumed.params(), uninterrupted)
    jax.tree.map(np.testing.assert_array_equal, state_arrays(resumed.state), full_state)


def test_cli_takes_param_dtype_and_low_precision(capsys: pytest.CaptureFixture[str]) -> None:
    config = main.parse_args(["--param-dtype", "bfloat16", "--low-precision", "kahan"])[0]
    assert (config.param_dtype, config.low_precision) == ("bfloat16", "kahan")
    with pytest.raises(SystemExit):
        main.parse_args(["--low-precision", "fp8"])
    assert "argument --low-precision: invalid choice: 'fp8'" in capsys.readouterr().err


def test_cli_takes_moments_and_second_moment(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--optimizer", "adam_mini", "--param-dtype", "bfloat16", "--low-precision"]
    config = main.parse_args([*argv, "stochastic", "--moments", "4bit", "--shard-optimizer"])[0]
    assert (config.optimizer, config.param_dtype, config.low_precision) == (
        "adam_mini",
        "bfloat16",
        "stochastic",
    )
    # Adam-mini's 4-bit first moment is sliced like its param: ZeRO-1 takes it.
    assert (config.moments, config.second_moment, config.shard_optimizer) == (
        "4bit",
        "default",
        True,
    )
    config = main.parse_args(["--moments", "8bit", "--second-moment", "factored"])[0]
    assert (config.moments, config.second_moment) == ("8bit", "factored")
    assert (Config().moments, Config().second_moment) == ("default", "default")
    with pytest.raises(SystemExit):
        main.parse_args(["--moments", "2bit"])
    assert "argument --moments: invalid choice: '2bit'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"optimizer": "sgd", "moments": "4bit"},
            "moments must be default with optimizer 'sgd', which takes no storage of its moments "
            "(moments 4bit works with adam, adamw, adam_l2,",
        ),
        ({"optimizer": "adam_8bit", "moments": "8bit"}, "with optimizer 'adam_8bit', which takes"),
        (
            {"optimizer": "adam_mini", "second_moment": "factored"},
            "second_moment must be default with optimizer 'adam_mini', which takes no storage of "
            "its second moment (second_moment factored works with adam, adamw,",
        ),
        (
            {"optimizer": "schedule_free_adamw", "moments": "4bit", "second_moment": "factored"},
            "moments must be default with optimizer 'schedule_free_adamw' and second_moment "
            "factored: the only moment storage it takes is the second moment's",
        ),
        ({"moments": "2bit"}, "moments must be one of default, 8bit, 4bit; got '2bit'"),
        ({"second_moment": "rank1"}, "second_moment must be one of default, factored; got 'rank1'"),
    ],
)
def test_config_rejects_moments_the_optimizer_does_not_store(
    settings: dict[str, str | bool], message: str
) -> None:
    """A storage of the moments is an error, naming the optimizer and those that take it, where
    it would store none of the optimizer's moments (optax's baselines, adam_8bit's own 8-bit
    moments, Adam-mini's own second moment), not a setting that is silently ignored; so is a
    second moment kept as row and column factors with --shard-optimizer."""
    with pytest.raises(ValueError, match=re.escape(message)):
        Config(**settings)


def test_4bit_moments_are_uint8_codes_and_factored_ones_rows_and_columns() -> None:
    """--moments 4bit: the moments of the CNN's large kernels are uint8 codes, two per byte,
    with float32 scales, and the leaves under 4096 elements stay float32. With
    --second-moment factored the second moment of a kernel whose two largest axes have at
    least 32 entries is a row and a column mean instead (per 3x3 position for conv2)."""
    dataset = synthetic_dataset(n_train=128, n_test=10)

    def opt_state(**settings: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        trainer = train.Trainer(Config(model="cnn", **settings), dataset)
        state = nnx.to_pure_dict(trainer.state)[1]["opt_state"]
        leaves = jax.tree_util.tree_leaves_with_path(state)
        return {jax.tree_util.keystr(path): (x.dtype.name, x.shape) for path, x in leaves}

    four_bit = opt_state(moments="4bit")
    for moment in ("mu", "nu"):
        assert four_bit[f"[0]['{moment}']['dense1']['kernel']['codes']"] == ("uint8", (3136, 128))
        assert four_bit[f"[0]['{moment}']['conv2']['kernel']['codes']"] == ("uint8", (3, 3, 32, 32))
        assert four_bit[f"[0]['{moment}']['conv1']['kernel']"] == ("float32", (3, 3, 1, 32))
    factored = opt_state(moments="4bit", second_moment="factored")
    assert factored["[0]['mu']['dense1']['kernel']['codes']"] == ("uint8", (3136, 128))
    assert factored["[0]['nu']['dense1']['kernel']['row']"] == ("float32", (3136, 1))
    assert factored["[0]['nu']['dense1']['kernel']['col']"] == ("float32", (1, 256))
    assert factored["[0]['nu']['conv2']['kernel']['row']"] == ("float32", (3, 3, 1, 64))
    assert factored["[0]['nu']['conv2']['kernel']['col']"] == ("float32", (3, 3, 32, 1))
    # Axes under 32 keep the moment whole: the input's single channel, the 10 classes.
    assert factored["[0]['nu']['conv1']['kernel']"] == ("float32", (3, 3, 1, 32))
    assert factored["[0]['nu']['dense2']['kernel']"] == ("float32", (256, 10))
    assert not [path for path in factored if "['nu']" in path and "codes" in path]


@pytest.fixture
def tiny32(monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a one-hidden-layer model whose 784 x 32 kernel is large enough to be
    quantized (4096 elements or more) and factored (both axes 32 or more)."""
    monkeypatch.setitem(models.MODELS, "tiny32", functools.partial(Tiny, hidden=32))
    return "tiny32"


def test_adam_mini_with_a_4bit_first_moment_and_bfloat16_params_takes_under_3_bytes(
    tiny32: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Adam-mini (one second moment per neuron) with a 4-bit first moment, bfloat16 params
    and stochastic rounding: under 3 bytes per parameter, measured from the arrays and
    printed when the run starts, and the run trains."""
    config = Config(
        model=tiny32,
        optimizer="adam_mini",
        param_dtype="bfloat16",
        low_precision="stochastic",
        moments="4bit",
        epochs=1,
        batch_size=32,
        checkpoints=False,
        progress=False,
    )
    trainer, history = train.train_and_evaluate(config, synthetic_dataset(n_train=128, n_test=50))
    assert (
        "25,450 parameters (bfloat16, stochastic, 4bit moments), bytes per parameter: "
        "2.00 params + 0.59 optimizer state = 2.59\n"
    ) in capsys.readouterr().out
    assert trainer.param_bytes + trainer.state_bytes <= 3.0 * trainer.num_params
    assert {leaf.dtype for leaf in jax.tree.leaves(trainer.params())} == {jnp.dtype(jnp.bfloat16)}
    codes = nnx.to_pure_dict(trainer.state)[1]["opt_state"]["inner_state"][0]["mu"]
    assert codes["dense1"]["kernel"]["codes"].dtype == jnp.uint8
    assert np.isfinite(history[-1]["train_loss"])


def test_4bit_and_factored_moments_resume_exactly(
    tiny32: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 4-bit first moment and a factored second moment train, keep their structure from
    step to step in the compiled step, and a resume from a checkpoint gives the uninterrupted
    run's params and state bit for bit."""
    dataset = synthetic_dataset(n_train=128, n_test=50)
    config = Config(
        model=tiny32,
        moments="4bit",
        second_moment="factored",
        epochs=2,
        batch_size=32,
        workdir=str(tmp_path / "run"),
        progress=False,
    )
    trainer, _ = train.train_and_evaluate(config, dataset)
    assert (
        "(float32, 4bit moments, factored second moment), bytes per parameter: 4.00 params + "
        "0.77 optimizer state = 4.77\n"
    ) in capsys.readouterr().out
    uninterrupted, full_state = trainer.params(), state_arrays(trainer.state)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "8")
    resumed, _ = train.train_and_evaluate(dataclasses.replace(config, resume=True), dataset)
    jax.tree.map(np.testing.assert_array_equal, resumed.params(), uninterrupted)
    jax.tree.map(np.testing.assert_array_equal, state_arrays(resumed.state), full_state)


def test_offloaded_state_trains_and_resumes_as_on_the_device(
    tiny32: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--offload-state: the optimizer state in host memory, the records, params and state of
    the run on the device bit for bit, and a resume from its checkpoint exact."""
    dataset = synthetic_dataset(n_train=128, n_test=50)
    config = Config(
        model=tiny32, epochs=2, batch_size=32, workdir=str(tmp_path / "device"), progress=False
    )
    on_device, _ = train.train_and_evaluate(config, dataset)
    offloaded_config = dataclasses.replace(
        config, offload_state=True, workdir=str(tmp_path / "host")
    )
    offloaded, _ = train.train_and_evaluate(offloaded_config, dataset)
    # The weights' moments go to host memory; the biases' (at most 32 entries) and the count
    # stay on the device (offload_state's min_offloaded_size).
    opt_state = nnx.to_pure_dict(offloaded.state)[1]["opt_state"]
    for leaf in jax.tree.leaves(opt_state):
        want = "pinned_host" if leaf.size >= 4096 else "device"
        assert leaf.sharding.memory_kind == want, leaf.shape
    host_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state) if x.size >= 4096)
    assert 0 < host_bytes < sum(x.nbytes for x in jax.tree.leaves(opt_state))
    per_param = host_bytes / sum(x.size for x in jax.tree.leaves(offloaded.params()))
    assert f"optimizer state in host memory: {per_param:.2f} bytes per" in capsys.readouterr().out
    assert records_without_timing(tmp_path / "host" / "metrics.jsonl") == records_without_timing(
        tmp_path / "device" / "metrics.jsonl"
    )
    jax.tree.map(np.testing.assert_array_equal, offloaded.params(), on_device.params())
    shutil.rmtree(tmp_path / "host" / "checkpoints" / "8")
    resumed, _ = train.train_and_evaluate(
        dataclasses.replace(offloaded_config, resume=True), dataset
    )
    jax.tree.map(np.testing.assert_array_equal, resumed.params(), on_device.params())
    jax.tree.map(
        np.testing.assert_array_equal, state_arrays(resumed.state), state_arrays(on_device.state)
    )


def test_flat_params_train_and_resume_as_the_models_own(tiny32: str, tmp_path: Path) -> None:
    """--flat-params on (what auto does on a GPU or TPU): the params in one buffer, trained by
    LAMB (per-tensor trust ratios) to the model's own params' records and params, to the
    rounding of the passes; a resume from its checkpoint exact, one with the params unpacked
    refused as a setting."""
    dataset = synthetic_dataset(n_train=128, n_test=50)
    config = Config(
        model=tiny32,
        optimizer="lamb",
        epochs=2,
        batch_size=32,
        workdir=str(tmp_path / "tree"),
        progress=False,
    )
    tree, _ = train.train_and_evaluate(config, dataset)
    flat_config = dataclasses.replace(config, flat_params="on", workdir=str(tmp_path / "flat"))
    packed, _ = train.train_and_evaluate(flat_config, dataset)
    assert packed.flat_params and not tree.flat_params  # auto: off on the CPU
    model, _ = nnx.merge(packed.graphdef, packed.state)
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 1
    for ours, theirs in zip(
        jax.tree.leaves(packed.params()), jax.tree.leaves(tree.params()), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(
        records_without_timing(tmp_path / "flat" / "metrics.jsonl"),
        records_without_timing(tmp_path / "tree" / "metrics.jsonl"),
        strict=True,
    ):
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            if isinstance(value, float):
                assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
            else:
                assert ours[key] == value, key
    shutil.rmtree(tmp_path / "flat" / "checkpoints" / "8")
    resumed, _ = train.train_and_evaluate(dataclasses.replace(flat_config, resume=True), dataset)
    jax.tree.map(np.testing.assert_array_equal, resumed.params(), packed.params())
    unpacked = dataclasses.replace(flat_config, flat_params="off", resume=True)
    with pytest.raises(SettingsMismatch, match="--flat-params on, this run has --flat-params off"):
        train.train_and_evaluate(unpacked, dataset)


def test_flat_params_are_packed_where_they_can_be(capsys: pytest.CaptureFixture[str]) -> None:
    """auto packs on a GPU or TPU, not on the CPU, and not where packing changes the run:
    for an optimizer that needs each param in its shape or evaluates per-param averages, nor
    with moments in 8-bit or 4-bit codes (taken over a buffer, in blocks across params); on
    with the first kind is one line, exit status 2."""
    assert train.packs_params(Config(), "gpu") and train.packs_params(Config(), "tpu")
    assert not train.packs_params(Config(), "cpu")
    for codes in (Config(moments="8bit"), Config(moments="4bit"), Config(optimizer="adam_8bit")):
        assert not train.packs_params(codes, "gpu")
        assert train.packs_params(dataclasses.replace(codes, flat_params="on"), "cpu")
    assert train.packs_params(Config(second_moment="factored"), "gpu")  # per param, packed
    assert train.packs_params(Config(flat_params="on"), "cpu")
    assert not train.packs_params(Config(flat_params="off"), "gpu")
    for name in ("soap", "schedule_free_adamw"):
        assert not train.packs_params(Config(optimizer=name), "gpu")
        with pytest.raises(ValueError, match=f"flat_params on: {name}"):
            train.packs_params(Config(optimizer=name, flat_params="on"), "cpu")
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(["--flat-params", "on", "--optimizer", "soap"])
    assert exit_info.value.code == 2
    assert (
        "error: --flat-params on: soap needs each param in its own shape (a Kronecker factor "
        "per dimension); use --flat-params off (or auto)\n"
    ) in capsys.readouterr().err


def test_restart_replaces_the_previous_run_at_its_first_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = synthetic_dataset(n_train=128, n_test=20)
    config = Config(model="mlp", epochs=2, batch_size=64, workdir=str(tmp_path), progress=False)
    train.train_and_evaluate(config, dataset)
    previous = (tmp_path / "metrics.jsonl").read_text()
    restart = dataclasses.replace(config, epochs=1, restart=True)
    # Killed before its first checkpoint (step 2): the previous run is intact.
    step = train.Trainer.step

    def killed(self: train.Trainer, indices: jax.Array, step_number: int) -> None:
        if step_number == 1:
            raise RuntimeError("killed")
        step(self, indices, step_number)

    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="killed"):
        patch.setattr(train.Trainer, "step", killed)
        train.train_and_evaluate(restart, dataset)
    assert (tmp_path / "metrics.jsonl").read_text() == previous
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]
    # Run to its end, it replaces them.
    _, history = train.train_and_evaluate(restart, dataset)
    assert len(history) == 1
    assert [m["kind"] for m in metrics.read(tmp_path / "metrics.jsonl")] == ["step", "epoch"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoints",
        "curves.png",
        "metrics.jsonl",
    ]
    # The same command without --restart continues (here: is done).
    _, history = train.train_and_evaluate(dataclasses.replace(restart, restart=False), dataset)
    assert len(history) == 1


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_only_on_a_terminal_and_say_compiling(tmp_path: Path, terminal: bool) -> None:
    """On a terminal the first bar reads "compiling the step" until the first loss arrives
    (not "loss 0.0000 ... 0 img/s"); written to a file there are no bars, only the epoch
    lines."""
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=terminal, color_system=None)
    config = Config(model="mlp", epochs=2, batch_size=64, workdir=str(tmp_path), checkpoints=False)
    train.train_and_evaluate(config, synthetic_dataset(n_train=128, n_test=20), console)
    text = out.getvalue()
    assert ("compiling the step" in text) == terminal
    assert ("epoch 1/2" in text) == terminal  # the bars' descriptions
    assert ("━" in text) == terminal
    assert "loss 0.0000" not in text
    assert text.count("epoch   2  train loss") == 1  # the epoch line, once


def test_compare_writes_table_and_plot(tmp_path: Path) -> None:
    dataset = synthetic_dataset(n_train=256, n_test=100)
    config = Config(
        model="mlp",
        epochs=2,
        batch_size=64,
        workdir=str(tmp_path),
        schedule="constant",  # So that the first update is not a step of size 0.
        checkpoints=False,
        log_every=1,
        progress=False,
    )
    results = compare.compare(config, ["adam", "sgd"], dataset)
    assert list(results) == ["adam", "sgd"]
    table = (tmp_path / "comparison.md").read_text()
    assert "| adam | 0.003 |" in table
    assert "| sgd | 0.1 |" in table
    for target in compare.targets(results):
        assert f"epochs to {target:.1%}" in table
    assert (tmp_path / "comparison.png").stat().st_size > 0
    # Same initialization and data order: the loss of the first step, taken before any
    # update, is the same for both; after one update with different rules it differs.
    adam, sgd = (
        [m["train_loss"] for m in metrics.read(tmp_path / name / "metrics.jsonl")][:2]
        for name in ("adam", "sgd")
    )
    assert adam[0] == sgd[0]
    assert adam[1] != sgd[1]
    # curves.png shows the loss of every logged step (4 per epoch here), not only per epoch.
    records = metrics.read(tmp_path / "adam" / "metrics.jsonl")
    per_step = train.curves_figure(records, "adam").axes[0].lines[0]
    assert list(per_step.get_xdata()) == [m["step"] / 4 for m in records if m["kind"] == "step"]
    assert len(per_step.get_xdata()) == 8
    assert (tmp_path / "adam" / "curves.png").stat().st_size > 0


def test_drawing_the_plots_leaves_the_matplotlib_backend_alone(tmp_path: Path) -> None:
    """``curves.png`` and ``comparison.png`` are drawn without switching the global backend,
    which in a notebook would stop every later cell from showing its figures."""
    import matplotlib

    previous = matplotlib.get_backend()
    matplotlib.use("pdf")  # any backend but the Agg that files are drawn with
    try:
        records: list[train.Metrics] = [
            {"kind": "step", "epoch": 0.5, "step": 1, "train_loss": 1.0},
            *(
                {"kind": "epoch", **m, "train_loss": m["test_loss"], "train_accuracy": None}
                for m in _history([0.5, 0.8, 0.9])
            ),
        ]
        train.plot_curves(records, tmp_path / "curves.png", "adam")
        compare.plot({"adam": _history([0.5, 0.8, 0.9])}, tmp_path / "comparison.png", "t")
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(previous)
    for name in ("curves.png", "comparison.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def _history(final_accuracies: list[float]) -> list[train.Metrics]:
    """Three epochs that rise to ``final_accuracies[-1]``."""
    return [
        {"epoch": e, "test_accuracy": a, "test_loss": 1 - a, "elapsed_seconds": 10.0 * e}
        for e, a in enumerate(final_accuracies, 1)
    ]


def test_compare_targets_and_ranges_come_from_the_results() -> None:
    """Fashion-MNIST ends near 90%: the targets and the plot's range follow (fixed 98% and
    99% targets and a 96-100% range left the table with dashes and the plot empty)."""
    results = {
        "adam": _history([0.85, 0.89, 0.912]),
        "sgd": _history([0.80, 0.86, 0.885]),
        "adagrad": _history([0.82, 0.88, 0.9019]),
    }
    assert compare.targets(results) == (0.885, 0.901)
    low, high = compare.accuracy_range(results)
    assert low < 88.5 and 91.2 < high <= 100
    config = Config(dataset="fashion_mnist")
    rows = compare.table(config, results).splitlines()[2:]
    # Every optimizer reaches the first target: its two columns are filled.
    assert all(row.split(" | ")[4] != "-" for row in rows)
    assert "| adam | 0.003 | 91.20% | 91.20% | 2 | 20 | 3 | 30 | 30 |" in rows


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


@pytest.mark.parametrize("name", ["adam", "adamw", "ademamix", "simplified_ademamix", "lamb"])
def test_adam_family_comes_from_the_registry(name: str) -> None:
    import adam_jax

    info = adam_jax.registry.get(name)
    direct = getattr(adam_jax, name)(1e-2, **info.example_options)
    params = {"w": jnp.linspace(-1.0, 1.0, 6)}
    grads = {"w": jnp.linspace(0.5, -0.3, 6)}
    ours, _ = optimizers.create(name, 1e-2).update(
        grads, optimizers.create(name, 1e-2).init(params), params
    )
    theirs, _ = direct.update(grads, direct.init(params), params)
    np.testing.assert_array_equal(ours["w"], theirs["w"])
    assert optimizers.PEAK_LEARNING_RATES[name] == info.learning_rate


@pytest.mark.parametrize("name", optimizers.SCHEDULES)
def test_schedules(name: str) -> None:
    schedule = optimizers.schedule(name, 1.0, total_steps=100, warmup_steps=10)
    if name == "constant":
        assert float(schedule(0)) == float(schedule(99)) == 1.0
        return
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1.0)
    end = 1.0 if name == "warmup_constant" else 0.0
    assert float(schedule(100)) == pytest.approx(end, abs=1e-6)


def test_schedule_free_runs_without_decay_and_is_evaluated_at_its_average(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Schedule-Free AdamW keeps its rate after the warm-up whatever --schedule says, and the
    test set sees the average x of its iterates, not the training params y."""
    config = Config(model="mlp", optimizer="schedule_free_adamw", batch_size=64, max_shift=0)
    trainer = train.Trainer(config, synthetic_dataset())
    rates = trainer.learning_rates
    warmup = round(config.warmup_epochs * trainer.steps_per_epoch)
    assert rates[0] == 0.0 and np.all(rates[warmup:] == rates[-1]) and rates[-1] > 0
    trainer.train_epoch(0)
    at_average = trainer.evaluate()
    monkeypatch.setattr(optimizers, "evaluation_params", lambda name, state, params: params)
    trainer._evaluate_batch = jax.jit(trainer._make_evaluate_batch())
    at_training_params = trainer.evaluate()
    assert at_average != at_training_params
    assert optimizers.schedule_name("adam", "warmup_cosine") == "warmup_cosine"
    assert optimizers.schedule_name("schedule_free_adamw", "warmup_cosine") == "warmup_constant"


def test_compare_with_several_seeds_averages_them(tmp_path: Path) -> None:
    """--seeds 2: each optimizer trains with seeds 0 and 1 in a folder of its own; the table
    and the plot show their per-epoch means, the table the spread of the final accuracy."""
    dataset = synthetic_dataset(n_train=128, n_test=50)
    config = Config(
        model="mlp", epochs=2, batch_size=64, workdir=str(tmp_path), schedule="constant",
        checkpoints=False, progress=False,
    )  # fmt: skip
    results = compare.compare(config, ["adam"], dataset, seeds=2)
    runs = [metrics.read(tmp_path / "adam" / f"seed{s}" / "metrics.jsonl") for s in (0, 1)]
    finals = [[m for m in run if "test_accuracy" in m][-1]["test_accuracy"] for run in runs]
    assert results["adam"][-1]["test_accuracy"] == pytest.approx(sum(finals) / 2)
    assert results["adam"][-1]["test_accuracy_min"] == min(finals)
    assert "±" in (tmp_path / "comparison.md").read_text()
    assert "seeds 0 to 1" in (tmp_path / "comparison.md").read_text()
    with pytest.raises(ValueError, match="seeds must be an integer >= 1"):
        compare.compare(config, ["adam"], dataset, seeds=0)


def test_cli_arguments() -> None:
    config, compared = main.parse_args(["--compare", "adam,sgd", "--train-limit", "300"])
    assert compared == ["adam", "sgd"]
    assert config.train_limit == 300
    assert main.parse_args([]) == (Config(), None)
    with pytest.raises(SystemExit):
        main.parse_args(["--compare", "adam,lion"])
    flags = ["--checkpoint-every", "50", "--keep-checkpoints", "2", "--log-every", "5"]
    config, _ = main.parse_args([*flags, "--skip-nonfinite", "--max-consecutive-skips", "4"])
    assert (config.checkpoint_every, config.keep_checkpoints, config.log_every) == (50, 2, 5)
    assert config.skip_nonfinite and config.max_consecutive_skips == 4
    assert main.resume_command(["--epochs", "3", "--workdir", "runs/my run"]) == (
        f"{launch.interpreter()} -m examples.mnist --epochs 3 --workdir 'runs/my run' --resume"
    )


def test_cli_silences_only_the_debris_of_failed_checkpoint_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable.exc_value))
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    try:
        main.quiet_leftovers_of_failed_writes()
        closed, other = RuntimeError("Event loop is closed"), RuntimeError("a bug")
        for error in (closed, other):
            sys.unraisablehook(types.SimpleNamespace(exc_value=error))
        assert seen == [other]
        assert [logger.level for logger in loggers] == [logging.CRITICAL] * 2
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def test_cli_reports_training_errors_without_traceback(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resume with another optimizer than the checkpoint's: one line, exit status 2 (a bad
    setting)."""
    argv = ["--data-dir", str(mnist_dir), "--model", "mlp", "--epochs", "1"]
    argv += ["--train-limit", "64", "--batch-size", "32", "--workdir", str(tmp_path)]
    main.main([*argv, "--no-progress"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main.main([*argv, "--no-progress", "--resume", "--optimizer", "adamw"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: cannot resume: the checkpoint of step 2 was written with --optimizer adam, this "
        "run has --optimizer adamw. Resume with the same setting, or add --restart to start "
        "over (the checkpoints stay until the new run's first checkpoint)\n"
    )


def test_cli_reports_data_errors(tmp_path: Path) -> None:
    for file in data.MNIST.files:
        (tmp_path / file.name).write_bytes(b"junk")
    with pytest.raises(SystemExit, match="train-images-idx3-ubyte.gz: not a complete gzip"):
        main.main(["--data-dir", str(tmp_path)])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be an integer >= 1, got 0"),
        ("batch_size", -1, "batch_size must be an integer >= 1, got -1"),
        ("eval_batch_size", 0, "eval_batch_size must be an integer >= 1, got 0"),
        ("max_shift", -2, "max_shift must be an integer >= 0, got -2"),
        ("train_limit", 100, "train_limit must be >= batch_size (128)"),
        ("warmup_epochs", -0.5, "warmup_epochs must be >= 0, got -0.5"),
        ("checkpoint_every", 0, "checkpoint_every must be an integer >= 1 (or None: at epoch"),
        ("keep_checkpoints", 0, "keep_checkpoints must be an integer >= 1, got 0"),
        ("log_every", 0, "log_every must be an integer >= 1, got 0"),
        ("max_consecutive_skips", 0, "max_consecutive_skips must be an integer >= 1, got 0"),
        ("model", "resnet", "model must be one of cnn, mlp, deep_cnn; got 'resnet'"),
        ("optimizer", "lion", "optimizer must be one of adam, adamw, adam_l2, nadam, nadamw,"),
        ("schedule", "cosine", "schedule must be one of warmup_cosine, warmup_stable_decay, "),
        ("dataset", "cifar10", "dataset must be one of mnist, fashion_mnist; got 'cifar10'"),
        ("learning_rate", float("nan"), "learning_rate must be finite and > 0, got nan"),
        ("learning_rate", -1e-3, "learning_rate must be finite and > 0, got -0.001"),
    ],
)
def test_config_rejects_bad_values(field: str, value: float, message: str) -> None:
    """A bad setting fails before any work, naming the setting, the value and the range."""
    with pytest.raises(ValueError, match=re.escape(message)):
        Config(**{field: value})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
        (["--epochs", "zero"], "argument --epochs: invalid int value: 'zero'"),
        (["--optimizer", "adamm"], "argument --optimizer: invalid choice: 'adamm'"),
        (
            ["--optimizer", "sgd", "--moments", "4bit"],
            "moments must be default with optimizer 'sgd'",
        ),
        (
            ["--compare", "adam,momentum", "--moments", "8bit"],
            "moments must be default with optimizer 'momentum'",
        ),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    ],
)
def test_cli_reports_bad_values_in_two_lines(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The error and a pointer to --help, not argparse's usage block above them."""
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(argv)
    assert exit_info.value.code == 2
    first, second = capsys.readouterr().err.splitlines()
    assert first.startswith("python -m examples.mnist: error: ")
    assert message in first
    assert second == "See 'python -m examples.mnist --help' for the options."


def test_cli_refuses_a_bad_workdir_before_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file, or a folder under one: two lines and exit status 2, as a bad value."""
    file = tmp_path / "file"
    file.write_text("")
    monkeypatch.setattr(data, "load", lambda *args: pytest.fail("the data was read"))
    for workdir, message in [(file, "is a file, not a folder"), (file / "run", "cannot make")]:
        with pytest.raises(SystemExit) as exit_info:
            main.main(["--workdir", str(workdir)])
        assert exit_info.value.code == 2
        first, _ = capsys.readouterr().err.splitlines()
        assert first.startswith(f"python -m examples.mnist: error: --workdir {workdir}")
        assert message in first


def test_cli_names_a_data_dir_that_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Said before anything else is tried: no download, no cache folder created."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    nowhere = tmp_path / "nowhere"
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--data-dir", str(nowhere), "--workdir", str(tmp_path / "run")])
    assert str(exit_info.value).startswith(f"error: data folder {nowhere} does not exist")
    assert not (tmp_path / "cache").exists()
