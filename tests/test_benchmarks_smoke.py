"""The benchmark harness runs end to end at tiny sizes: structure of its results, not timings."""

from __future__ import annotations

import itertools
import json
import math
import os
import shlex
import signal
from pathlib import Path
from typing import Any

import pytest

import adam_jax
from benchmarks import compare_revisions, program_hashes, run, summarize
from benchmarks.mnist_low_precision import Setting
from benchmarks.sections import low_precision, variants

REFERENCE = "optax.adam"
OURS = "adam_jax.adam"


def test_every_section_is_documented_in_the_module_docstring() -> None:
    for name, section in run.SECTIONS.items():
        assert f"``{name}``" in run.__doc__
        assert section.description


def test_leaves_and_state_bytes_sections_write_their_rows(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    argv = ["--sections", "leaves", "state_bytes", "--quick", "--repeats", "3"]
    run.main([*argv, "--out", str(out), "--plot", str(tmp_path / "plot.png")])
    results = json.loads(out.read_text())

    assert results["machine"]["cpu_count"] > 0
    for section in ("leaves", "state_bytes"):
        command = results["section_runs"][section]["command"]
        assert command.startswith("python -m benchmarks.run " + " ".join(argv))
        assert results["section_seconds"][section] > 0

    leaves = results["leaves"]
    trees = {row["tree"] for row in leaves}
    assert len(trees) >= 2 and len(leaves) == 2 * len(trees)
    for tree in trees:
        rows = {row["variant"]: row for row in leaves if row["tree"] == tree}
        assert set(rows) == {REFERENCE, OURS}
        assert rows[REFERENCE]["ratio_vs_optax"] == 1.0
        assert math.isfinite(rows[OURS]["ratio_vs_optax"]) and rows[OURS]["ratio_vs_optax"] > 0
        for row in rows.values():
            assert row["num_leaves"] * row["leaf_size"] > 0
            assert 0 < row["min_ms"] <= row["median_ms"]
            assert row["repeats"] == 3

    state_bytes = results["state_bytes"]
    assert {row["tree"] for row in state_bytes} == {"1 x 16M", "transformer-like", "mnist_cnn"}
    for row in state_bytes:
        assert row["state_bytes"] > 0
        assert row["bytes_per_param"] == row["state_bytes"] / row["num_params"]
    float32 = [r for r in state_bytes if r["storage"] == "optax.adam (float32)"]
    assert all(math.isclose(r["bytes_per_param"], 8.0, rel_tol=1e-3) for r in float32)

    tables = summarize.summarize(results)
    assert "time / optax.adam" in tables and "bytes per parameter" in tables
    assert (tmp_path / "plot.png").exists()


def test_a_run_stopped_mid_section_keeps_the_rows_it_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (``timeout``, a lent device's time running out) in the middle of a section: the
    rows the section had finished are written, marked as stopped early; the sections recorded
    before are kept; the run exits with 143."""

    def stopped_section(settings: run.Settings) -> list[dict[str, Any]]:
        settings.finished.append({"row": 1})
        os.kill(os.getpid(), signal.SIGTERM)
        settings.finished.append({"row": 2})  # never reached: the signal stops the section
        return list(settings.finished)

    sections = {
        "state_bytes": run.SECTIONS["state_bytes"],
        "stopped": run.Section(stopped_section, "a section stopped half way"),
    }
    monkeypatch.setattr(run, "SECTIONS", sections)
    out = tmp_path / "results.json"
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        run.main(["--sections", "state_bytes", "stopped", "--quick", "--out", str(out)])
    assert stop.value.code == 143
    assert signal.getsignal(signal.SIGTERM) == previous  # main put the handler back
    results = json.loads(out.read_text())
    assert results["stopped"] == [{"row": 1}]
    assert results["section_runs"]["stopped"]["stopped_early"] is True
    assert results["state_bytes"] and "stopped_early" not in results["section_runs"]["state_bytes"]
    assert not list(tmp_path.glob("*.partial"))


def test_revision_comparison_takes_medians_over_processes() -> None:
    def process(ratio_1: float, ratio_64: float) -> dict:
        rows = [
            {"tree": tree, "variant": variant, "ratio_vs_optax": ratio, "median_ms": 2.0 * ratio}
            for tree, ratio in (("1 x 4", ratio_1), ("64 x 4", ratio_64))
            for variant, ratio in ((REFERENCE, 1.0), (OURS, ratio))
        ]
        return {"machine": {}, "leaves": rows}

    baseline = compare_revisions.summarize_runs(
        compare_revisions.BASELINE, [process(1.0, 0.9), process(1.2, 1.0), process(0.8, 1.1)]
    )
    candidate = compare_revisions.summarize_runs(
        compare_revisions.CANDIDATE, [process(0.5, 1.0), process(0.6, 1.0), process(0.7, 1.0)]
    )
    assert [(r["tree"], r["ratio_vs_optax_median"]) for r in baseline] == [
        ("1 x 4", 1.0),
        ("64 x 4", 1.0),
    ]
    assert candidate[0]["ratio_vs_optax_per_run"] == [0.5, 0.6, 0.7]
    assert candidate[0]["adam_jax_median_ms"] == 1.2
    table = compare_revisions.table(baseline + candidate)
    assert "| 1 x 4 | 1.000 (0.800-1.200) | 0.600 (0.500-0.700) | 0.600 |" in table


def test_eight_bit_section_times_four_variants_and_the_fused_kernel(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    run.main(["--sections", "eight_bit", "--quick", "--repeats", "3", "--out", str(out)])
    all_rows = json.loads(out.read_text())["eight_bit"]
    kernel_rows = [row for row in all_rows if row.get("comparison") == "fused kernel"]
    rows = {row["variant"]: row for row in all_rows if row not in kernel_rows}
    # The fused kernel's rows, interpreted on CPU under --quick.
    assert [(row["variant"], row["kernel"]) for row in kernel_rows] == [
        (OURS, "interpret"),
        ("adam_jax.adam_8bit", "interpret"),
        ("adam_8bit, fused kernel", "interpret"),
    ]
    assert set(rows) == {
        OURS,
        "adam_jax.adam_8bit",
        "adam_8bit, in slices",
        "linear int8 blocks",
    }
    assert rows[OURS]["ratio_vs_float32"] == 1.0
    for row in [*rows.values(), *kernel_rows]:
        assert math.isfinite(row["ratio_vs_float32"]) and row["ratio_vs_float32"] > 0
        assert row["page_faults_per_step"] >= 0 and row["repeats"] == 3
    tables = summarize.summarize(json.loads(out.read_text()))
    assert "time / float32" in tables and "linear int8 blocks" in tables
    assert "adam_8bit, fused kernel" in tables


def test_leaf_cost_section_counts_kernels_and_times_the_no_op(tmp_path: Path) -> None:
    """``leaf_cost``: every tree has the three steps and the two no-ops; the no-ops launch
    nothing and take the same arguments as their steps; on a tree, Adam launches more kernels
    as the leaves grow and takes 4 buffers a leaf and the count, on flat params the same
    program whatever the leaves."""
    from benchmarks.sections import leaf_cost

    out = tmp_path / "results.json"
    run.main(["--sections", "leaf_cost", "--quick", "--repeats", "3", "--out", str(out)])
    rows = json.loads(out.read_text())["leaf_cost"]
    trees = list(dict.fromkeys(row["num_leaves"] for row in rows))
    assert len(trees) >= 2 and len(rows) == 5 * len(trees)
    by = {(row["num_leaves"], row["variant"]): row for row in rows}
    for n in trees:
        for name in (leaf_cost.NOOP_TREE, leaf_cost.NOOP_FLAT):
            assert by[n, name]["kernels"] == 0 and "noop_share" not in by[n, name]
        for name in (REFERENCE, OURS):
            assert by[n, name]["num_args"] == by[n, leaf_cost.NOOP_TREE]["num_args"] == 4 * n + 1
        assert by[n, leaf_cost.FLAT]["num_args"] == by[n, leaf_cost.NOOP_FLAT]["num_args"] == 5
        for name in (REFERENCE, OURS, leaf_cost.FLAT):
            row = by[n, name]
            assert row["kernels"] >= row["fusions"] + row["custom_calls"] > 0
            assert row["kernels"] == sum(row["opcodes"].values())
            assert row["noop_share"] > 0 and math.isfinite(row["noop_share"])
            assert math.isclose(
                row["us_per_kernel"] * row["kernels"], 1e3 * (row["median_ms"] - row["noop_ms"])
            )
            assert row["dispatch_ms"] > 0 and 0 < row["min_ms"] <= row["median_ms"]
            assert row["repeats"] == 3 and row["compile_s"] > 0
    few, many = min(trees), max(trees)
    assert by[many, OURS]["kernels"] > by[few, OURS]["kernels"]
    assert by[many, leaf_cost.FLAT]["opcodes"] == by[few, leaf_cost.FLAT]["opcodes"]
    assert "per-leaf cost" in summarize.summarize(json.loads(out.read_text()))


def test_kernel_counts_follow_command_buffers_and_loops_not_fusions() -> None:
    """The counter reads an optimized module as XLA:GPU writes one: fusions inside a command
    buffer (a ``call``) and a loop body count, a fusion's own instructions and a reducer's do
    not."""
    from benchmarks.sections.leaf_cost import kernel_counts

    hlo = """HloModule jit_step, entry_computation_layout={(f32[16]{0})->f32[16]{0}}

%fused_add (param_0: f32[16]) -> f32[16] {
  %param_0 = f32[16]{0} parameter(0)
  ROOT %add.1 = f32[16]{0} add(%param_0, %param_0)
}

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.2 = f32[] add(%a, %b)
}

%command_buffer (p: f32[16]) -> (f32[16], f32[16]) {
  %p = f32[16]{0} parameter(0)
  %f.1 = f32[16]{0} fusion(%p), kind=kLoop, calls=%fused_add
  %f.2 = f32[16]{0} fusion(%f.1), kind=kLoop, calls=%fused_add
  ROOT %t = (f32[16]{0}, f32[16]{0}) tuple(%f.1, %f.2)
}

%body (s: (s32[], f32[16])) -> (s32[], f32[16]) {
  %s = (s32[], f32[16]{0}) parameter(0)
  %x = f32[16]{0} get-tuple-element(%s), index=1
  %i = s32[] get-tuple-element(%s), index=0
  %f.3 = f32[16]{0} fusion(%x), kind=kLoop, calls=%fused_add
  ROOT %r = (s32[], f32[16]{0}) tuple(%i, %f.3)
}

%cond (s.1: (s32[], f32[16])) -> pred[] {
  %s.1 = (s32[], f32[16]{0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%s.1), index=0
  %c = s32[] constant(4)
  ROOT %lt = pred[] compare(%i.1, %c), direction=LT
}

ENTRY %main.9 (x.1: f32[16]) -> f32[16] {
  %x.1 = f32[16]{0} parameter(0)
  %call = (f32[16]{0}, f32[16]{0}) call(%x.1), to_apply=%command_buffer
  %g = f32[16]{0} get-tuple-element(%call), index=1
  %total = f32[] reduce(%g, %zero), dimensions={0}, to_apply=%sum
  %cc = f32[16]{0} custom-call(%g), custom_call_target="kernel"
  %z = s32[] constant(0)
  %init = (s32[], f32[16]{0}) tuple(%z, %cc)
  %while = (s32[], f32[16]{0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[16]{0} get-tuple-element(%while), index=1
}
"""
    counts = kernel_counts(hlo)
    assert counts["opcodes"] == {"compare": 1, "custom-call": 1, "fusion": 3, "reduce": 1}
    assert (counts["kernels"], counts["fusions"], counts["custom_calls"]) == (6, 3, 1)


def test_linear_int8_blocks_round_trip_within_half_a_step() -> None:
    """The benchmark's codec-free storage is a real block-wise code: every value comes back
    within half a step (max |x| / 254) of its block."""
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.sections.eight_bit import BLOCK, LinearInt8Blocks

    storage = LinearInt8Blocks()
    x = np.random.default_rng(0).standard_normal(4 * BLOCK).astype(np.float32)
    x[:BLOCK] *= 1e-3  # a block of small values keeps its own scale
    back = np.asarray(storage.load(storage.store(jnp.asarray(x), storage.init(x))))
    blocks_max = np.abs(x).reshape(-1, BLOCK).max(axis=1, keepdims=True)
    error = np.abs(back - x).reshape(-1, BLOCK)
    assert np.all(error <= blocks_max / 254 * (1 + 1e-6))


def test_variants_section_times_each_variant_against_optax_and_adamw(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    run.main(["--sections", "variants", "--quick", "--repeats", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["variants"]
    trees = {row["tree"] for row in rows}
    assert len(rows) == len(trees) * len(variants.VARIANTS)
    for row in rows:
        has_namesake = variants.VARIANTS[row["variant"]][1] is not None
        assert (row["ratio_vs_optax"] is not None) == has_namesake
        assert math.isfinite(row["ratio_vs_adamw"]) and row["ratio_vs_adamw"] > 0
        assert row["repeats"] == 2
    tables = summarize.summarize(json.loads(out.read_text()))
    assert "time / optax" in tables and "schedule_free_adamw" in tables


def test_low_precision_section_times_the_wrappers_against_the_plain_step(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    run.main(["--sections", "low_precision", "--quick", "--repeats", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["low_precision"]
    trees = {row["tree"] for row in rows}
    assert len(rows) == len(trees) * len(low_precision.VARIANTS)
    for row in rows:
        assert math.isfinite(row["ratio_vs_plain"]) and row["ratio_vs_plain"] > 0
        if row["variant"] == "bfloat16 plain":
            assert row["ratio_vs_plain"] == 1.0
    assert "time / plain bfloat16" in summarize.summarize(json.loads(out.read_text()))


def test_program_hashes_tell_programs_apart_and_repeat() -> None:
    adam = program_hashes.program_hash(adam_jax.adam(1e-2))
    assert adam == program_hashes.program_hash(adam_jax.adam(1e-2))
    assert adam != program_hashes.program_hash(adam_jax.adam(1e-2, b1=0.8))
    assert adam != program_hashes.program_hash(adam_jax.nadam(1e-2))


@pytest.mark.slow
def test_memory_section_measures_params_state_and_step() -> None:
    import jax

    from benchmarks.models import transformer_params
    from benchmarks.sections import memory

    # Compiled for the settings the assertions read; every setting steps abstractly.
    names = (
        "float32 AdamW",
        "Adam-mini",
        "bfloat16 + SR, 8-bit mu, Adam-mini nu",
        "bfloat16 + SR, 4-bit mu, Adam-mini nu",
    )
    rows = {row["setting"]: row for row in memory.measure(layers=1, names=names)}
    assert set(rows) == set(names)
    tree = jax.eval_shape(lambda: transformer_params(jax.random.key(0), layers=1))
    for name, (dtype, make) in memory.SETTINGS.items():
        params = jax.tree.map(lambda x, dtype=dtype: jax.ShapeDtypeStruct(x.shape, dtype), tree)
        tx = make()
        updates, _ = jax.eval_shape(tx.update, params, jax.eval_shape(tx.init, params), params)
        assert jax.tree.structure(updates) == jax.tree.structure(params), name
    adamw = rows["float32 AdamW"]
    assert adamw["params_bytes_per_param"] == 4 and adamw["bytes_per_param"] < 12.001
    # Donated params and state come back in place: the outputs alias the arguments.
    assert adamw["step_alias_bytes_per_param"] == pytest.approx(adamw["bytes_per_param"], 1e-3)
    assert rows["Adam-mini"]["state_bytes_per_param"] < 4.1
    assert rows["bfloat16 + SR, 8-bit mu, Adam-mini nu"]["bytes_per_param"] < 3.2
    assert rows["bfloat16 + SR, 4-bit mu, Adam-mini nu"]["bytes_per_param"] <= 3.0


def test_memory_step_time_section_times_every_setting() -> None:
    from benchmarks.sections import memory_step_time

    names = (memory_step_time.REFERENCE, "4-bit moments")
    rows = memory_step_time.measure(layers=1, repeats=2, names=names)
    assert [row["setting"] for row in rows] == list(names)
    assert rows[0]["ratio_vs_8bit"] == 1.0 and rows[1]["median_ms"] > 0


def _bytes_per_param_of_each_setting(settings: dict[str, Setting], params: Any) -> dict[str, float]:
    """Every setting's optimizer initializes on ``params`` in its dtype and takes a step,
    abstractly (``jax.eval_shape``: nothing is compiled); the bytes of its params and state
    per parameter."""
    import jax

    num_params = sum(p.size for p in jax.tree.leaves(params))
    per_param = {}
    for name, (factory, dtype) in settings.items():
        typed = jax.tree.map(lambda p, dtype=dtype: p.astype(dtype), params)
        tx = factory(1e-3, 0)
        state = jax.eval_shape(tx.init, typed)
        updates, _ = jax.eval_shape(tx.update, typed, state, typed)
        assert jax.tree.structure(updates) == jax.tree.structure(typed), name
        total = adam_jax.state_bytes(typed) + adam_jax.state_bytes(state)
        per_param[name] = total / num_params
    return per_param


def test_mnist_memory_settings_train_resume_and_tabulate(tmp_path: Path) -> None:
    import numpy as np
    from flax import nnx

    from benchmarks import mnist_low_precision, mnist_memory
    from examples.mnist import data, models

    params = nnx.state(models.create("cnn", 0), nnx.Param)
    per_param = _bytes_per_param_of_each_setting(mnist_memory.SETTINGS, params)
    assert per_param["bfloat16 + SR, 4-bit mu, Adam-mini nu"] <= 3.0
    assert max(per_param.values()) == per_param[mnist_memory.BASELINE]
    # Random images: the run and its records are checked, not what it learns.
    rng = np.random.default_rng(0)

    def split(n: int) -> data.Split:
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        return data.Split(images, rng.integers(0, 10, n).astype(np.int32))

    dataset = data.Dataset(train=split(256), test=split(20), spec=data.MNIST)
    # Compiling a step takes seconds, the 4-bit codec's several times the plain one's: only the
    # baseline trains; the loop is the same for every setting.
    settings = {mnist_memory.BASELINE: mnist_memory.SETTINGS[mnist_memory.BASELINE]}
    out = tmp_path / "mnist_memory.json"
    runs = mnist_low_precision.run(settings, [0], 1, dataset, out, train_limit=256)
    assert mnist_low_precision.run(settings, [0], 1, dataset, out, train_limit=256) == runs
    (run_,) = runs
    assert run_["setting"] == mnist_memory.BASELINE and 0 <= run_["test_accuracy"] <= 1
    assert run_["param_bytes_per_param"] + run_["state_bytes_per_param"] == pytest.approx(
        per_param[mnist_memory.BASELINE]
    )
    table = mnist_low_precision.table(runs, mnist_memory.SETTINGS, mnist_memory.BASELINE)
    assert f"| {mnist_memory.BASELINE} | 1 |" in table and "| vs float32 Adam |" in table


def test_lm_memory_settings_train_resume_and_tabulate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flax import nnx

    from benchmarks import lm_low_precision, lm_memory
    from examples.lm.model import GPT, ModelConfig

    # The example's model, one block of it, with short windows and batches, curve points of 5
    # steps. Compiling a step takes seconds, so only the baseline trains.
    model = {**lm_low_precision.MODEL, "layers": 1, "seq_len": 8}
    params = nnx.state(GPT(ModelConfig(**model), rngs=nnx.Rngs(0)), nnx.Param)
    _bytes_per_param_of_each_setting(lm_memory.SETTINGS, params)
    storages = lm_memory.positions_as_embedding(params)
    assert storages["position"].block_shape == (1, model["d_model"])  # one block per position
    assert storages["embed"].block_shape == (1, model["d_model"])  # one per token, by its name
    constants = {"MODEL": model, "WINDOW": 8, "BATCH": 4, "EVAL_WINDOWS": 4, "AVERAGE_OVER": 5}
    for constant, value in constants.items():
        monkeypatch.setattr(lm_low_precision, constant, value)
    out = tmp_path / "lm_memory.json"
    argv = ["--steps", "10", "--peak", "2e-3", "--seeds", "0", "--out", str(out)]
    argv += ["--settings", "float32 AdamW"]
    lm_memory.main(argv)
    record = json.loads(out.read_text())
    assert record["command"] == "python -m benchmarks.lm_memory " + shlex.join(argv)
    (run_,) = record["runs"]
    assert run_["setting"] == "float32 AdamW" and len(run_["curve"]) == 2
    assert run_["peak_learning_rate"] == 2e-3
    assert math.isfinite(run_["held_out_loss"])
    lm_memory.main(argv)  # resumes: nothing left to run
    assert json.loads(out.read_text())["runs"] == record["runs"]
    assert "| vs float32 AdamW at 0.002 |" in capsys.readouterr().out
    other = {**record, "model": lm_low_precision.MODEL | {"layers": 2}}
    out.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="holds the runs of another model"):
        lm_memory.main(argv)


def test_lm_study_processes_sharing_an_out_file_keep_each_others_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import lm_low_precision

    out = tmp_path / "study.json"
    other = {"setting": "b", "seed": 1, "held_out_loss": 2.0, "seconds": 1.0, "curve": [2.0]}

    def train(setting: Any, steps: int, data: Any, seed: int, peak: float) -> Any:
        if peak == 0.5:  # another process (seed 1) ends a run while this one trains
            record = {"steps": steps, "peak_learning_rate": peak, "runs": [other]}
            out.write_text(json.dumps(record))
        return [1.5], float(seed + peak)

    monkeypatch.setattr(lm_low_precision, "train", train)
    settings: Any = {"a": None, "b": None}
    runs = lm_low_precision.run(settings, [0, 1], 50, out, "cmd", peaks=(0.5,))
    record = json.loads(out.read_text())
    pairs = sorted((r["setting"], r["seed"]) for r in record["runs"])
    assert pairs == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]  # ("b", 1) trained once, there
    assert {**other, "peak_learning_rate": 0.5} in record["runs"] and len(runs) == 4
    assert {r["peak_learning_rate"] for r in runs} == {0.5} and not list(tmp_path.glob("*.tmp"))
    # A sweep adds the runs of other rates beside them; those of 0.5 resume.
    runs = lm_low_precision.run({"a": None}, [0], 50, out, "cmd", peaks=(0.5, 0.25))
    swept = [r["held_out_loss"] for r in runs if r["peak_learning_rate"] == 0.25]
    assert len(runs) == 5 and swept == [0.25]
    table = lm_low_precision.table(runs, settings, "b")
    assert "| vs b at 0.5 |" in table and "| a | 0.25 | 1 | 0.2500 | 0.2500 | -80.00% |" in table


@pytest.mark.slow
def test_soap_section_times_soap_against_adamw_with_the_eigenbasis_share() -> None:
    from benchmarks.sections import soap

    (row,) = soap.measure((8,), repeats=2, layers=0)
    assert row["precondition_frequency"] == soap.FREQUENCY and row["repeats"] == 2
    assert row["adamw_ms_per_step"] > 0 and row["soap_ms_per_step"] > 0
    assert row["ratio_vs_adamw"] > 0 and row["eigenbasis_share"] < 1
    assert row["block_soap_ms_per_step"] > 0 and row["block_ratio_vs_adamw"] > 0
    assert row["block_eigenbasis_share"] < 1
    # The compressed storages keep less state; the products cover the tree's matrices.
    assert row["compressed_state_bytes_per_param"] < row["block_state_bytes_per_param"]
    assert row["compressed_ratio_vs_adamw"] > 0 and row["unrectified_ratio_vs_adamw"] > 0
    assert row["practical_ratio_vs_adamw"] > 0
    assert row["practical_state_bytes_per_param"] < row["block_state_bytes_per_param"]
    assert row["block_products_ratio_vs_adamw"] > 0
    assert 0 < row["block_products_params"] < row["num_params"]
    assert row["block_products_bfloat16_ratio_vs_adamw"] > 0 and row["block_qr_ratio_vs_adamw"] > 0
    assert row["block_qr_count"] > 0
    assert row["other_orthogonalization"] == "cholesky_qr"  # the CPU's default is QR
    assert row["other_soap_ratio_vs_adamw"] > 0 and row["other_practical_ratio_vs_adamw"] > 0
    assert row["block_cholesky_qr_over_qr"] > 0 and row["block_eigh_ms"] > 0


def test_soap_section_floors_compute_the_products_and_qrs_they_time() -> None:
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.sections import soap

    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((3, 8, 6)), jnp.float32) for _ in range(2))
    # Each block transposed.
    np.testing.assert_array_equal(soap._transposed(a), np.swapaxes(np.asarray(a), 1, 2))
    # Products of the bfloat16-rounded operands, summed in float32.
    rounded = [np.asarray(x.astype(jnp.bfloat16), np.float64) for x in (a, b)]
    for cb, expected in (
        (2, np.einsum("nik,njk->nij", *rounded)),
        (1, np.einsum("nik,nkj->nij", rounded[0], np.swapaxes(rounded[1], 1, 2))),
    ):
        got = soap._bfloat16_product(a, b if cb == 2 else jnp.swapaxes(b, 1, 2), cb)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The QRs' Q: orthonormal columns whose span reproduces each matrix (Q Q^T F = F).
    f = jnp.asarray(rng.standard_normal((4, 16, 16)), jnp.float32)
    (q,), unused = soap.block_qrs((f,), None, jnp.zeros(()))
    assert unused.shape == ()
    np.testing.assert_allclose(
        np.swapaxes(q, 1, 2) @ q, np.broadcast_to(np.eye(16), q.shape), atol=1e-5
    )
    np.testing.assert_allclose(q @ (np.swapaxes(q, 1, 2) @ f), f, atol=1e-4)
    # Cholesky QR's: the same Q up to its columns' signs; the eigh's: eigenvectors of each.
    (chol,), _ = soap.block_cholesky_qrs((f,), None, jnp.zeros(()))
    aligned = chol * np.sign(np.sum(np.asarray(chol) * np.asarray(q), axis=1, keepdims=True))
    np.testing.assert_allclose(aligned, q, atol=1e-4)
    s = f + jnp.swapaxes(f, 1, 2)
    (v,), _ = soap.block_eighs((s,), None, jnp.zeros(()))
    rotated = np.swapaxes(v, 1, 2) @ np.asarray(s) @ v
    off_diagonal = rotated - np.einsum("nii->ni", rotated)[:, :, None] * np.eye(16)
    np.testing.assert_allclose(off_diagonal, 0, atol=1e-4)


def test_soap_steps_window_ratio_finds_the_slowest_window() -> None:
    from benchmarks.sections.soap_steps import worst_window_ratio

    # A refresh every 4th step, 3x as slow: every window of 4 holds one.
    times = [1.0, 1.0, 1.0, 3.0] * 3
    assert worst_window_ratio(times, 4) == 3.0
    assert worst_window_ratio([1.0, 1.1, 0.9, 1.0, 1.2], 3) == 1.2 / 1.0


@pytest.mark.slow
def test_soap_steps_section_times_each_setting_staggered_and_not() -> None:
    from benchmarks.harness import Settings
    from benchmarks.sections import soap_steps

    rows = soap_steps.run(Settings(quick=True))
    assert [(r["setting"], r["stagger_refresh"]) for r in rows] == [
        ("float32", False),
        ("float32", True),
        ("compressed", False),
        ("compressed", True),
    ]
    for row in rows:
        assert row["steps"] == soap_steps.FREQUENCY and row["worst_window_ratio"] >= 1
        assert row["median_ms"] > 0 and row["mean_ms"] > 0 and row["mean_ratio_vs_adamw"] > 0


def test_soap_state_section_shrinks_the_state_with_each_option() -> None:
    from benchmarks.harness import Settings
    from benchmarks.sections import soap_state

    rows = soap_state.run(Settings(quick=True))
    assert [r["setting"] for r in rows] == ["AdamW", *soap_state.SETTINGS]
    assert 8 <= rows[0]["state_bytes_per_param"] < 8.01  # two floats a param, and a count
    chain = rows[1:-1]  # each adds one option; the last row is the practical setting apart
    assert rows[-1]["setting"] == soap_state.PRACTICAL_NAME
    for column in ("state_bytes_per_param", "both_sides_state_bytes_per_param"):
        soap = [r[column] for r in chain]
        assert all(after < before for before, after in itertools.pairwise(soap)), column
        bases_in_bfloat16 = next(r for r in chain if r["setting"] == "+ bfloat16 bases")
        assert bases_in_bfloat16[column] <= rows[-1][column] < chain[2][column], column


def test_lm_race_crossing_is_linear_between_evaluations() -> None:
    from benchmarks import lm_race

    losses, steps = [4.0, 3.0, 2.0, 1.0], [0, 50, 100, 150]
    assert lm_race.crossing(losses, steps, 2.5) == pytest.approx(75.0)
    assert lm_race.crossing(losses, steps, 2.0) == pytest.approx(100.0)
    assert lm_race.crossing(losses, steps, 0.5) is None


@pytest.mark.slow
def test_lm_race_quick_tunes_runs_resumes_and_reports(tmp_path: Path) -> None:
    from flax import nnx

    from benchmarks import lm_race
    from examples.lm.model import GPT, ModelConfig

    model = GPT(ModelConfig(**lm_race.QUICK_MODEL), rngs=nnx.Rngs(0))
    labels = nnx.to_pure_dict(lm_race.hidden_matrices(nnx.state(model, nnx.Param)))
    assert labels["blocks"][0]["qkv"]["kernel"] and labels["blocks"][0]["down"]["kernel"]
    assert not labels["embed"] and not labels["head"]["kernel"]
    assert not labels["blocks"][0]["qkv"]["bias"] and not labels["blocks"][0]["norm1"]["scale"]

    out, png = tmp_path / "race.json", tmp_path / "race.png"
    names = ["adamw", "muon + adamw"]
    argv = ["--quick", "--optimizers", *names, "--out", str(out), "--plot", str(png)]
    finals = lm_race.main(argv)
    record = json.loads(out.read_text())
    assert record["command"] == "python -m benchmarks.lm_race " + shlex.join(argv)
    tried = {(r["setting"], r["peak_learning_rate"]) for r in record["runs"]}
    assert tried == {(name, rate) for name in names for rate in lm_race.GRIDS[name][:2]}
    assert png.stat().st_size > 0
    timing = record["step_times"]
    assert timing["rates"] == {name: finals[name]["peak_learning_rate"] for name in names}
    assert timing["ms"] == {name: finals[name]["step_ms"] for name in names}

    adamw = finals["adamw"]
    assert adamw["final_held_out_loss"] == min(adamw["grid"].values())
    assert adamw["steps_ratio"] == adamw["seconds_ratio"] == adamw["step_ratio"] == 1.0
    for name in names:
        entry = finals[name]
        assert len(entry["held_out_losses"]) == len(entry["seconds"]) == 2  # steps 0 and 50
        assert entry["held_out_losses"][-1] < entry["held_out_losses"][0]
        assert entry["state_bytes_per_param"] > 0 and entry["step_ms"] > 0
        assert entry["step_ms_timed_side_by_side"]
        if entry["steps_to_target"] is not None:
            assert 0 < entry["steps_to_target"] <= lm_race.EVAL_EVERY
    # Muon keeps one moment for the hidden matrices, AdamW two for the rest.
    assert 4 < finals["muon + adamw"]["state_bytes_per_param"] < adamw["state_bytes_per_param"]
    assert lm_race.main(argv) == finals  # resumed: nothing runs again, the same report
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": lm_race.MODELS["small"], "runs": []}))
    with pytest.raises(SystemExit, match="holds the runs of another model"):
        lm_race.main(["--quick", "--optimizers", "adamw", "--out", str(other), "--plot", str(png)])


def test_offload_section_on_a_gpu_also_times_a_whole_train_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The section's GPU branch (a larger tree and a whole train step, offloaded as by default
    and in the gradients' order), run here on CPU arrays with the backend's name faked and the
    tree made small."""
    from benchmarks.sections import offload

    monkeypatch.setattr(
        offload, "GPU_TREE", {"layers": 1, "d": 16, "ff": 32, "vocab": 64, "seq": 8}
    )
    monkeypatch.setattr(offload, "GPU_BATCH", (2, 9))
    monkeypatch.setattr(offload.jax, "default_backend", lambda: "gpu")
    rows = offload.time_rows(repeats=2, layers=1)
    assert [(row["tree"], row["setting"]) for row in rows] == [
        ("transformer, 98M", "float32 AdamW"),
        ("transformer, 98M", "8-bit moments"),
        ("transformer, 98M, train step", "float32 AdamW"),
        ("transformer, 98M, train step", "float32 AdamW, gradient order, prefetch=4"),
    ]
    for row in rows:
        assert row["offloaded_median_ms"] > 0 and row["ratio_vs_device"] > 0


def test_offload_section_times_each_setting_offloaded_against_on_the_device() -> None:
    from benchmarks.sections import offload

    rows = offload.time_rows(repeats=2, layers=1)
    assert [row["setting"] for row in rows] == list(offload.TIMED)
    for row in rows:
        assert row["device_median_ms"] > 0 and row["offloaded_median_ms"] > 0
        assert row["ratio_vs_device"] > 0 and row["repeats"] == 2


def test_offload_section_times_a_leaf_whole_and_in_slices() -> None:
    from benchmarks.sections import offload

    rows = offload.slice_time_rows(repeats=2, shape=(3 * offload.SLICE_ELEMENTS // 1000, 1000))
    (row,) = rows
    assert row["whole_median_ms"] > 0 and row["sliced_median_ms"] > 0
    assert row["ratio_vs_whole"] > 0 and row["repeats"] == 2


def test_soap_branches_compares_programs_that_compute_the_same() -> None:
    """The cond cycle and the selection cycle whose times give ``cond_us`` agree, and the row
    has its figures."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.sections import soap_branches

    arrays = [jnp.full((8,), float(i % 3) - 1.0) for i in range(5)]
    by_cond, _ = jax.jit(soap_branches.branches)(arrays, None, jnp.zeros(()))
    by_selection, _ = jax.jit(soap_branches.selections)(arrays, None, jnp.zeros(()))
    np.testing.assert_array_equal(np.stack(by_cond), np.stack(by_selection))
    assert not np.array_equal(np.stack(by_cond), np.stack(arrays))
    row = soap_branches.measure_branch(repeats=2)
    assert row["cycle_with_conds_ms"] > 0 and row["cycle_with_selections_ms"] > 0


def test_measured_programs_time_each_program_beside_the_first(tmp_path: Path) -> None:
    """Each program's row: its compiled program's counts, the time model's prediction, its
    median and its ratio to the first program's, timed in the same rounds (FlatParams
    too, its params and gradients flattened); a program that cannot run here (ZeRO-1 on two
    devices) is an error row and the others go on."""
    from benchmarks import measured_programs

    out = tmp_path / "programs.json"
    names = ["adamw", "ZeRO-1 adamw, 2 devices", "adamw_8bit, FlatParams", "adamw_8bit"]
    argv = ["--tree", "small", "--card", "h100", "--repeats", "2", "--out", str(out)]
    measured_programs.main([*argv, "--programs", *names])
    rows = {row["program"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == names
    assert "layout 'zero1'" in rows["ZeRO-1 adamw, 2 devices"]["error"]
    flat = rows["adamw_8bit, FlatParams"]
    assert flat["ratio_vs_first"] > 0 and flat["kernels"] < rows["adamw_8bit"]["kernels"]
    first, eight_bit = rows["adamw"], rows["adamw_8bit"]
    assert "ratio_vs_first" not in first and first["median_ms"] > 0
    assert eight_bit["ratio_vs_first"] > 0 and eight_bit["median_ms"] > 0
    assert eight_bit["kernels"] > first["kernels"] > 0
    assert eight_bit["predicted_ms"] > first["predicted_ms"] > 0


def test_gpu_codes_counts_the_codes_and_params_that_differ() -> None:
    """Two runs of one device agree everywhere; a code moved by 3 steps (a 4-bit code in a
    byte's high half too) and a param moved by two learning rates are counted as such."""
    import jax
    import numpy as np

    from benchmarks import gpu_codes

    params, grads = gpu_codes._inputs((64, 300))
    cpu = jax.devices("cpu")[0]
    for name, tx in gpu_codes.optimizers().items():
        run = gpu_codes.stepped(tx, params, grads, cpu)
        same = gpu_codes.compare(name, run, gpu_codes.stepped(tx, params, grads, cpu))
        assert same["params_largest_difference_in_lr"] == 0.0
        assert all(c["differing"] == 0 for c in same["codes"]) and len(same["codes"]) == 2
        moved_params, moved_state = run[0].copy(), jax.tree.map(np.copy, run[1])
        moved_params[0, 0] += 2 * gpu_codes.LR
        codes = next(x for x in jax.tree.leaves(moved_state) if x.dtype == np.uint8)
        shift, top = (4, 15) if name.startswith("4-bit") else (0, 255)
        code = (int(codes[0, 0]) >> shift) & top
        codes[0, 0] = int(codes[0, 0]) + (3 if code + 3 <= top else -3) * (1 << shift)
        moved = gpu_codes.compare(name, (moved_params, moved_state), run)
        assert moved["params_largest_difference_in_lr"] == pytest.approx(2.0, rel=1e-3)
        assert [c["differing"] for c in moved["codes"]] == [1, 0]
        assert moved["codes"][0]["most_steps"] == 3
