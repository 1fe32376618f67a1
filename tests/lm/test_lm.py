"""The language-model example end to end on a tiny model: every mesh of 8 CPU devices and two
processes train as one device does, within float32 rounding; bad flags are one line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import jax
import numpy as np
import optax
import pytest

import adam_jax
from adam_jax._src.variants.soap import SoapLayout
from adam_jax._src.variants.soap.rule import ScaleBySoapState
from examples.common import distributed, launch
from examples.common.checkpoints import Checkpoints, SettingsMismatch
from examples.common.errors import Interrupted
from examples.lm import data, loop, main, train
from examples.lm.model import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = ModelConfig(layers=1, d_model=32, heads=2, seq_len=16)
TINY_TWO_LAYERS = ModelConfig(layers=2, d_model=32, heads=2, seq_len=16)
CONFIG = train.Config(
    model=TINY, steps=4, batch_size=8, eval_every=2, eval_windows=8, learning_rate=1e-2
)
# The float32 roundings that differ between meshes: sums over the batch and the gathers, split
# differently over the devices.
RTOL = 1e-5


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_bytes(data.load()[:100_000].tobytes())
    return path


@pytest.fixture(scope="module")
def corpus(text: Path) -> data.Corpus:
    return data.Corpus(data.load(text), TINY.seq_len)


def trainer_on(mesh: str, config: train.Config = CONFIG) -> train.Trainer:
    sizes = train.parse_mesh(mesh)
    devices = jax.devices()[: int(np.prod(list(sizes.values())))]
    return train.Trainer(config, train.make_mesh(sizes, devices))


def trained(
    config: train.Config, corpus: data.Corpus, mesh: str, **options
) -> tuple[list, train.Trainer]:
    trainer = trainer_on(mesh, config)
    return loop.Run(trainer, corpus, loop.RunOptions(**options)).train(), trainer


def losses(records: list) -> np.ndarray:
    return np.array([(r["train_loss"], r["held_out_loss"]) for r in records])


@pytest.fixture(scope="module")
def one_device(corpus: data.Corpus) -> tuple[list, train.Trainer]:
    return trained(CONFIG, corpus, "data=1")


def host_params(params) -> dict[str, np.ndarray]:
    """The params by path, as NumPy arrays. The keys' bias has a zero gradient in exact
    arithmetic (it shifts every score of a query alike), so Adam steps on rounding noise there:
    its third of the qkv bias is left out."""
    leaves = {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    d = TINY.d_model
    qkv_bias = "['blocks'][0]['qkv']['bias'].value"
    leaves[qkv_bias] = leaves[qkv_bias][np.r_[0:d, 2 * d : 3 * d]]
    return leaves


def shard_fraction(leaf: jax.Array) -> float:
    return leaf.addressable_shards[0].data.size / leaf.size


@pytest.mark.parametrize(
    ("mesh", "zero1"),
    # The two-dimensional mesh with ZeRO-1 (its plain form is the two-process test's).
    [("data=8", False), ("fsdp=8", False), ("data=2,fsdp=4", True)],
)
def test_mesh_trains_as_one_device(corpus, one_device, mesh: str, zero1: bool) -> None:
    records, trainer = trained(train.Config(**{**vars(CONFIG), "zero1": zero1}), corpus, mesh)
    reference_records, reference = one_device
    np.testing.assert_allclose(losses(records), losses(reference_records), rtol=RTOL)
    got, want = host_params(trainer.params), host_params(reference.params)
    for path in want:
        difference = np.linalg.norm(got[path] - want[path])
        assert difference <= RTOL * np.linalg.norm(want[path]), path
    sizes = train.parse_mesh(mesh)
    # FSDP: every matrix (all of them have a dimension that 8 divides) keeps 1/fsdp per
    # device, and so do its moments; ZeRO-1 splits the moments over data as well.
    kernel = trainer.params["blocks"][0]["up"]["kernel"][...]
    assert shard_fraction(kernel) == 1 / sizes["fsdp"]
    moments = [leaf for leaf in jax.tree.leaves(trainer.opt_state) if leaf.shape == kernel.shape]
    assert moments
    for moment in moments:
        assert shard_fraction(moment) == 1 / (sizes["fsdp"] * (sizes["data"] if zero1 else 1))


def factors_and_bases(opt_state) -> list[jax.Array]:
    """SOAP's per-leaf factor and basis vectors (``gg``, ``q``) that are not empty."""
    return [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
        if any(getattr(key, "name", None) in ("gg", "q") for key in path) and leaf.size
    ]


def resumed(config: train.Config, corpus: data.Corpus, mesh: str, workdir: Path) -> loop.Run:
    """A run of ``config`` on ``mesh`` that has continued from ``workdir``'s checkpoints."""
    run = loop.Run(trainer_on(mesh, config), corpus, loop.RunOptions(workdir=workdir))
    try:
        run.begin()
    finally:
        assert run.checkpoints is not None
        run.checkpoints.close()
    return run


def soap_vectors_by_param(trainer: train.Trainer) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """SOAP's factor and basis vectors (``gg``, then ``q``) with their params' shapes, on the
    host."""
    (state,) = [
        node
        for node in jax.tree.leaves(
            trainer.opt_state, is_leaf=lambda x: isinstance(x, ScaleBySoapState)
        )
        if isinstance(node, ScaleBySoapState)
    ]
    shapes = [tuple(leaf.shape) for leaf in jax.tree.leaves(trainer.params)]
    return [
        (shape, np.asarray(vector))
        for field in (state.gg, state.q)
        for shape, vector in zip(shapes, jax.tree.leaves(field), strict=True)
    ]


@pytest.mark.slow
def test_soap_blocks_split_over_the_mesh(corpus, tmp_path, capsys) -> None:
    """SOAP with --opt block_size on data=2,fsdp=4 --zero1: each device keeps its own blocks'
    factors and bases (over both axes: an eighth of them), the fullest device within 1.25x an
    even split, and the run trains as the same blocks kept whole on every device do (data=8,
    block_axis None). SOAP on a mesh differs from one device by more than float32 rounding, with its
    factors split or not (docs/language_model.md): the mesh's other rounding of the gradient
    moves the eigenbases. The run resumes on another mesh of 8 devices (data=8: the same
    vectors), and on 4 devices, whose vectors are laid out otherwise, with its blocks re-laid
    (one line says so): every block's factors and bases those the 8 devices saved, bit for bit,
    and the run steps on from them."""
    soap = {**vars(CONFIG), "optimizer": "soap", "options": {"block_size": 16}}
    workdir = tmp_path / "run"
    records, trainer = trained(
        train.Config(**{**soap, "zero1": True}), corpus, "data=2,fsdp=4", workdir=workdir
    )
    whole_options = {"block_size": 16, "block_axis": None}
    reference, _ = trained(train.Config(**{**soap, "options": whole_options}), corpus, "data=8")
    np.testing.assert_allclose(losses(records), losses(reference), rtol=RTOL)
    spread = factors_and_bases(trainer.opt_state)
    assert spread
    for leaf in spread:
        assert leaf.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
        assert shard_fraction(leaf) == 1 / 8
    total = adam_jax.state_bytes(trainer.opt_state)
    assert adam_jax.device_state_bytes(trainer.opt_state) <= 1.25 * total / 8
    config = train.Config(**soap)
    capsys.readouterr()
    run = resumed(config, corpus, "data=4", workdir)
    assert "re-laying SOAP's blocks from 8 devices to 4" in capsys.readouterr().out
    assert run.step == CONFIG.steps
    layout = SoapLayout(10000, merge_dims=False, precondition_1d=False, block_size=16)
    saved, relaid = soap_vectors_by_param(trainer), soap_vectors_by_param(run.trainer)
    assert any(layout.on_devices(4).size(shape) != vector.size for shape, vector in saved)
    for (shape, want), (_, got) in zip(saved, relaid, strict=True):
        assert got.shape == (layout.on_devices(4).size(shape),)
        for a, b in zip(
            layout.on_devices(4).unpack_blocks(got, shape),
            layout.on_devices(8).unpack_blocks(want, shape),
            strict=True,
        ):
            for x, y in zip(a, b, strict=True):
                assert (x is None) == (y is None)
                if x is not None:
                    np.testing.assert_array_equal(x, y)
    for leaf in factors_and_bases(run.trainer.opt_state):
        assert leaf.sharding.spec == jax.sharding.PartitionSpec("data")
    # It steps on from the re-laid state (a step past the run's last, outside the loop).
    run.trainer.step(corpus.windows(run.starts[-1]))
    assert np.isfinite(run.trainer.take_loss_sum())
    run = resumed(config, corpus, "data=8", workdir)
    assert run.step == CONFIG.steps
    for got, want in zip(factors_and_bases(run.trainer.opt_state), spread, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_soap_storage_in_codes_is_not_relaid() -> None:
    """Factors or bases stored as 8-bit or 4-bit codes cannot be re-laid for another count: the
    resume is refused naming the option (checked before any array is read)."""
    quantized = adam_jax.BlockwiseQuantized(signed=True)
    config = train.Config(optimizer="soap", options={"block_size": 16, "basis_dtype": quantized})
    with pytest.raises(ValueError, match="--opt basis_dtype=BlockwiseQuantized.*cannot be re-laid"):
        train.relayout_blocks(config, 8, 4)
    bfloat16 = train.Config(
        optimizer="soap", options={"block_size": 16, "factor_dtype": "bfloat16"}
    )
    train.relayout_blocks(bfloat16, 8, 4)


def test_a_conversion_takes_up_a_setting_that_differs(tmp_path: Path) -> None:
    """The checkpoints' hook for a setting whose arrays can be converted: the array whose shape
    differs is read as written (to the host), the checksum checked on it, the converted array
    placed as this run's; a conversion that refuses, or a setting it does not take, is refused
    by name."""
    mesh = train.make_mesh({"data": 2, "fsdp": 1}, jax.devices()[:2])
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    written = {
        "v": jax.device_put(np.arange(8.0, dtype=np.float32), split),
        "w": jax.device_put(np.float32(3), whole),
    }
    checkpoints = Checkpoints(tmp_path, 2, print)
    assert checkpoints.save(1, written, {"settings": {"n": 8, "lr": 1}, **RUN_RECORD})
    target = {"v": jax.device_put(np.zeros(4, np.float32), split), "w": written["w"]}
    seen = []

    def halves(was, now):
        def convert(tree):
            seen.append((was, now, type(tree["v"]), tree["v"].shape))
            return tree | {"v": tree["v"][::2]}

        return convert

    restored = checkpoints.restore_latest(target, {"n": 4, "lr": 1}, {"n": halves})
    assert restored is not None and seen == [(8, 4, np.ndarray, (8,))]
    np.testing.assert_array_equal(np.asarray(restored.tree["v"]), [0.0, 2.0, 4.0, 6.0])
    assert restored.tree["v"].sharding == split

    def refuses(was, now):
        raise ValueError("it cannot be done")

    with pytest.raises(SettingsMismatch, match="with --n 8, this run has --n 4: it cannot be done"):
        checkpoints.restore_latest(target, {"n": 4, "lr": 1}, {"n": refuses})

    def fails(was, now):
        def convert(tree):
            raise ValueError("the arrays do not fit")

        return convert

    # Refused, not taken for damage: the checkpoint stays where it is.
    with pytest.raises(SettingsMismatch, match="step 1: its arrays cannot be converted"):
        checkpoints.restore_latest(target, {"n": 4, "lr": 1}, {"n": fails})
    assert checkpoints.manager.all_steps() == [1]
    with pytest.raises(SettingsMismatch, match="--lr 1, this run has --lr 2. Resume"):
        checkpoints.restore_latest(target, {"n": 4, "lr": 2}, {"n": halves})
    checkpoints.close()


RUN_RECORD = {"records": 0, "logged_step": 0, "elapsed_seconds": 0.0}


def test_soap_without_block_size_says_its_factors_stay_whole() -> None:
    mesh = {"data": 2, "fsdp": 4}
    note = train.placement_note(train.Config(optimizer="soap"), mesh)
    assert note is not None and "--opt block_size=N" in note
    blocks = train.Config(optimizer="soap", options={"block_size": 16})
    assert train.placement_note(blocks, mesh) is None
    assert train.placement_note(train.Config(optimizer="adamw"), mesh) is None
    assert train.placement_note(train.Config(optimizer="soap"), {"data": 1, "fsdp": 1}) is None
    assert train.block_axis(mesh) == ("data", "fsdp")
    assert train.block_axis({"data": 4, "fsdp": 1}) == "data"
    assert train.block_axis({"data": 1, "fsdp": 8}) == "fsdp"
    assert train.block_axis({"data": 1, "fsdp": 1}) is None


def test_model_flops_utilization_where_the_peak_is_known(corpus, monkeypatch) -> None:
    trainer = trainer_on("data=2")
    assert trainer.model_flops_utilization(1e5) is None  # a CPU's peak is not in the table
    monkeypatch.setitem(train.PEAK_FLOPS, "cpu", 1e9)
    records = loop.Run(trainer, corpus, loop.RunOptions()).train()
    flops_per_token = 6 * trainer.param_count + 12 * TINY.layers * TINY.seq_len * TINY.d_model
    for record in records:
        want = flops_per_token * record["tokens_per_second"] / 2e9
        assert record["model_flops_utilization"] == pytest.approx(want)


def test_step_exports_for_gpu_and_tpu() -> None:
    """The sharded step lowers for the accelerators (where this machine cannot run it)."""
    trainer = trainer_on("data=2,fsdp=4", train.Config(**{**vars(CONFIG), "zero1": True}))
    tokens = jax.ShapeDtypeStruct(
        (CONFIG.batch_size, TINY.seq_len + 1), np.int32, sharding=trainer.batch_sharding
    )
    with jax.set_mesh(trainer.mesh):
        exported = jax.export.export(jax.jit(trainer.train_step), platforms=["cuda", "tpu"])(
            trainer.params, trainer.opt_state, trainer.loss_sum, tokens
        )
    assert exported.platforms == ("cuda", "tpu")


def test_loss_falls(one_device) -> None:
    records, _ = one_device
    assert records[-1]["held_out_loss"] < records[0]["held_out_loss"] < np.log(256)


def test_two_processes_train_as_one_and_stop_together(
    text: Path, one_device, tmp_path: Path, capfd, monkeypatch
) -> None:
    """Two processes of 2 devices train as one device does. SIGTERM that reaches only the
    second after its step 3 stops both after that step, with one checkpoint and one stop line
    (the first process's), and the command it prints resumes them."""
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    monkeypatch.delenv("XLA_FLAGS")  # each process asks for the 2 devices it brings
    flags = ["--mesh", "data=2,fsdp=2", "--data", str(text), "--workdir", str(tmp_path),
             "--steps", "4", "--batch-size", "8", "--eval-every", "2", "--eval-windows", "8",
             "--learning-rate", "1e-2", "--layers", "1", "--d-model", "32", "--heads", "2",
             "--seq-len", "16"]  # fmt: skip
    signalled = [sys.executable, str(REPO_ROOT / "tests" / "lm" / "signalled_process.py"), "1", "3",
                 "SIGTERM", str(tmp_path / "signalled_at")]  # fmt: skip
    processes = launch.commands(2, flags, launch.free_port(), "examples.lm")
    processes = [[*signalled, *command[3:]] for command in processes]  # less python -m PROGRAM
    assert launch.run(processes, grace_seconds=60, resume="RESUME") == 128 + signal.SIGTERM
    assert checkpoint_steps(tmp_path) == [3]
    out, err = capfd.readouterr()
    assert "[Gloo]" not in out  # gloo's connection lines, printed from C++, are left out
    assert err.count("stopped by SIGTERM") == 1 and "RESUME" not in err, err
    assert "stopped by SIGTERM after step 3 (of 4)" in err
    resume = err.split("Resume with: ")[1].splitlines()[0]
    launcher = f"{launch.interpreter()} -m examples.lm.launch --num-processes 2 --mesh data=2"
    assert resume.startswith(launcher + ",fsdp=2")
    assert "--process-id" not in resume and resume.endswith(" --resume")
    finished = subprocess.run(shlex.split(resume), capture_output=True, timeout=300)  # as printed
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]
    assert "resuming from step 3 of 4" in finished.stdout.decode()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(losses(records), losses(one_device[0]), rtol=RTOL)
    assert checkpoint_steps(tmp_path) == [3, 4]


@pytest.mark.slow
def test_command_line_trains_on_a_mesh(text: Path, tmp_path: Path, capsys) -> None:
    main.main(["--data", str(text), "--mesh", "data=2,fsdp=4", "--zero1", "--steps", "2",
               "--batch-size", "16", "--grad-accumulation", "2", "--eval-every", "1",
               "--eval-windows", "8", "--layers", "1", "--d-model", "32", "--heads", "2",
               "--seq-len", "16", "--optimizer", "laprop",
               "--opt", "b2=0.99", "--workdir", str(tmp_path), "--moments", "8bit",
               "--param-dtype", "bfloat16", "--low-precision", "stochastic",
               "--offload-state"])  # fmt: skip
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert (tmp_path / "curves.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "step      2/2" in out and "in host memory" in out
    # 8-bit moments of the large matrices (the rest float32) and a key: under 8 bytes.
    assert float(out.split("optimizer state: ")[1].split()[0]) < 4


def test_an_offloaded_state_comes_over_in_the_order_of_the_gradients() -> None:
    """With ``--offload-state`` the trainer hands ``offload_state`` the order in which its
    backward pass computes the gradients: the head's and the final norm's first, the block's,
    then the position table's and the embedding's (the tree's order starts with the blocks).
    That the state comes over in that order, with the same values, is tested in
    tests/test_offload.py."""
    config = train.Config(**{**vars(CONFIG), "offload_state": True, "model": TINY_TWO_LAYERS})
    trainer = trainer_on("data=1", config)
    paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainer.params)[0]
    ]
    assert paths[0].startswith("['blocks']")
    order = [paths[i] for i in trainer.leaf_order]
    assert sorted(order) == sorted(paths)
    assert order[0].startswith(("['head']", "['norm']")) and order[-1].startswith("['embed']")
    first_of = [
        next(i for i, p in enumerate(order) if p.startswith(f"['blocks'][{b}]")) for b in (0, 1)
    ]
    assert first_of[1] < first_of[0]
    assert trainer_on("data=1").leaf_order is None


def dot_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """The operands' dtypes of every ``dot_general`` of ``jaxpr`` and the jaxprs inside it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(var.aval.dtype) for var in eqn.invars))
        for param in eqn.params.values():
            for inner in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns"):
                    found.extend(dot_operand_dtypes(inner))
    return found


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_compute_dtype_runs_the_matmuls_in_it_with_float32_params(
    corpus, compute_dtype: str
) -> None:
    """Mixed precision: every matrix product of the loss (the embedding's, the layers', the
    attention's and the head's) takes bfloat16 operands, while the params and their gradients
    stay float32 and the loss is float32; the default computes in float32 throughout."""
    model = ModelConfig(**{**vars(TINY), "compute_dtype": compute_dtype})
    trainer = trainer_on("data=1", train.Config(**{**vars(CONFIG), "model": model}))
    assert {leaf.dtype for leaf in jax.tree.leaves(trainer.params)} == {np.dtype("float32")}
    tokens = corpus.windows(corpus.batches(0, 1, CONFIG.batch_size)[0])
    jaxpr = jax.make_jaxpr(trainer._loss_of)(trainer.params, tokens)
    dots = dot_operand_dtypes(jaxpr.jaxpr)
    # embedding, qkv, out, up, down, head, and attention's two products
    assert len(dots) >= 8
    assert set(dots) == {(compute_dtype, compute_dtype)}
    loss, grads = jax.jit(jax.value_and_grad(trainer._loss_of))(trainer.params, tokens)
    assert loss.dtype == np.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {np.dtype("float32")}
    assert all(bool(np.isfinite(leaf).all()) for leaf in jax.tree.leaves(grads))


def test_bfloat16_params_compute_in_bfloat16_whatever_the_compute_dtype() -> None:
    for compute_dtype in ("float32", "bfloat16"):
        model = ModelConfig(param_dtype="bfloat16", compute_dtype=compute_dtype)
        assert model.matmul_dtype == "bfloat16"
    assert ModelConfig().matmul_dtype == "float32"


def test_bfloat16_compute_trains_as_float32_does(corpus, one_device) -> None:
    """bfloat16 products change the losses by bfloat16's rounding, not the training."""
    model = ModelConfig(**{**vars(TINY), "compute_dtype": "bfloat16"})
    records, _ = trained(train.Config(**{**vars(CONFIG), "model": model}), corpus, "data=1")
    np.testing.assert_allclose(losses(records), losses(one_device[0]), rtol=2e-2)


@pytest.mark.parametrize(("mesh", "zero1"), [("data=1", False), ("data=2,fsdp=4", True)])
def test_gradient_accumulation_steps_as_one_batch(corpus, mesh: str, zero1: bool) -> None:
    """Four micro-batches of 8 windows give the loss and the gradients of one batch of 32 on
    the same windows, and the same params after a step, within float32 rounding, each
    micro-batch split over the mesh as the whole batch is. The step is SGD's at a constant rate,
    whose update is the gradient's multiple (Adam's divides each entry by its own size, which
    makes the rounding of entries near zero as large as the rest)."""
    config = train.Config(
        **{**vars(CONFIG), "batch_size": 32, "zero1": zero1, "schedule": "constant"}
    )
    accumulating = train.Config(**{**vars(config), "grad_accumulation": 4})
    whole, accumulated = (
        train.Trainer(c, trainer_on(mesh).mesh, optimizer=optax.sgd) for c in (config, accumulating)
    )
    windows = corpus.windows(corpus.batches(0, 1, 32)[0])
    micro_batches_seen = []
    loss_of = accumulated._loss_of

    def watched(params, tokens):
        micro_batches_seen.append((tokens.shape, jax.typeof(tokens).sharding.spec[0]))
        return loss_of(params, tokens)

    accumulated._loss_of = watched  # type: ignore[method-assign]
    with jax.set_mesh(whole.mesh):
        tokens = whole.put(windows)
        loss, grads = jax.jit(whole.loss_and_grads)(whole.params, tokens)
        micro_loss, micro_grads = jax.jit(accumulated.loss_and_grads)(whole.params, tokens)
    accumulated._loss_of = loss_of  # type: ignore[method-assign]
    assert micro_batches_seen == [((8, TINY.seq_len + 1), train.AXES)]
    assert float(micro_loss) == pytest.approx(float(loss), rel=1e-6)
    for got, want in zip(jax.tree.leaves(micro_grads), jax.tree.leaves(grads), strict=True):
        assert got.dtype == want.dtype == np.float32
        assert got.sharding.spec == want.sharding.spec
        # relative to the leaf's largest gradient (an entry near zero has no relative scale)
        difference = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
        assert difference <= 1e-6 * float(np.max(np.abs(np.asarray(want)))), difference
    for trainer in (whole, accumulated):
        trainer.step(windows)
    got, want = host_params(accumulated.params), host_params(whole.params)
    for path in want:
        difference = np.linalg.norm(got[path] - want[path])
        assert difference <= 1e-6 * np.linalg.norm(want[path]), path
    assert accumulated.take_loss_sum() == pytest.approx(whole.take_loss_sum(), rel=1e-6)


def test_resume_with_gradient_accumulation(corpus, tmp_path: Path) -> None:
    """A run of two micro-batches a step, stopped after step 3, resumes bit for bit as the
    unbroken run; its checkpoints resume with another number of micro-batches too (as on
    another mesh: the same step, rounded otherwise), and with another dtype of products."""
    config = train.Config(**{**vars(CONFIG), "grad_accumulation": 2})
    unbroken, reference = trained(config, corpus, "data=1")
    options = {"workdir": tmp_path / "run", "checkpoint_every": 2}
    interrupted = trainer_on("data=1", config)
    stopped_after(interrupted, 3, "sigterm")
    with pytest.raises(Interrupted):
        loop.Run(interrupted, corpus, loop.RunOptions(**options)).train()
    records, resumed_trainer = trained(config, corpus, "data=1", **options)
    assert [{**r, "tokens_per_second": 0} for r in records] == [
        {**r, "tokens_per_second": 0} for r in unbroken
    ]
    for leaf, want in zip(
        jax.tree.leaves(resumed_trainer.params), jax.tree.leaves(reference.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))
    run = resumed(CONFIG, corpus, "data=1", tmp_path / "run")
    assert run.step == CONFIG.steps
    # ... and with products in another dtype, which checkpoints do not record.
    model = dataclasses.replace(CONFIG.model, compute_dtype="bfloat16")
    run = resumed(dataclasses.replace(CONFIG, model=model), corpus, "data=1", tmp_path / "run")
    assert run.step == CONFIG.steps


def test_opt_storage_wins_over_moments() -> None:
    """``--moments 8bit --opt nu_dtype=bfloat16``: the first moment in 8-bit codes, the second
    in bfloat16 (SOAP's setting to use, benchmarks/lm_gpt2_gpu.sh)."""
    config = train.Config(moments="8bit", options={"nu_dtype": "bfloat16"})
    tx = train.registry_optimizer(config, 1e-3)
    state = tx.init({"w": jax.numpy.zeros((64, 128))})
    (adam,) = [
        s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "nu")) if hasattr(s, "nu")
    ]
    assert adam.nu["w"].dtype == jax.numpy.bfloat16
    assert isinstance(adam.mu["w"], adam_jax.QuantizedArray)


def test_time_optimizer_gives_its_share_of_the_step(text: Path, tmp_path: Path, capsys) -> None:
    main.main(["--data", str(text), *TINY_FLAGS, "--workdir", str(tmp_path), "--time-optimizer"])
    out = capsys.readouterr().out
    share = json.loads((tmp_path / "optimizer_share.json").read_text())
    assert share["optimizer_seconds"] > 0 and share["share"] > 0
    assert share["share"] == pytest.approx(share["optimizer_seconds"] / share["step_seconds"])
    assert loop.describe_share(share) in out
    assert re.search(r"optimizer [\d.]+ ms of [\d.]+ ms a step \(\d+%\)", out), out


def stopped_after(trainer: train.Trainer, steps: int, how: str) -> None:
    """Makes ``trainer`` end the run once ``steps`` steps are done: SIGTERM (which the run
    answers with a checkpoint) or a crash (an exception that leaves the files as kill -9
    would, the last checkpoint being the newest)."""
    step, done = trainer.step, []

    def counted(windows: np.ndarray) -> None:
        if len(done) == steps and how == "crash":
            raise RuntimeError("killed")
        step(windows)
        done.append(1)
        if len(done) == steps and how == "sigterm":
            signal.raise_signal(signal.SIGTERM)

    trainer.step = counted  # type: ignore[method-assign]


@pytest.mark.parametrize(("how", "checkpoint"), [("sigterm", 3), ("crash", 2)])
def test_resume_is_bit_identical(corpus, one_device, tmp_path: Path, how, checkpoint) -> None:
    options = {"workdir": tmp_path, "checkpoint_every": 2}
    interrupted = trainer_on("data=1")
    stopped_after(interrupted, 3, how)
    with pytest.raises(Interrupted if how == "sigterm" else RuntimeError) as stop:
        loop.Run(interrupted, corpus, loop.RunOptions(**options)).train()
    if how == "sigterm":
        assert stop.value.checkpoint_step == checkpoint
    assert max(int(path.name) for path in (tmp_path / "checkpoints").iterdir()) == checkpoint
    records, resumed = trained(CONFIG, corpus, "data=1", **options)
    reference_records, reference = one_device
    assert records == [
        {**record, "tokens_per_second": mine["tokens_per_second"]}
        for record, mine in zip(reference_records, records, strict=True)
    ]
    for leaf, want in zip(
        jax.tree.leaves(resumed.params), jax.tree.leaves(reference.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))


def test_damaged_checkpoint_is_moved_aside(corpus, one_device, tmp_path: Path) -> None:
    options = {"workdir": tmp_path, "checkpoint_every": 2}
    interrupted = trainer_on("data=1")
    stopped_after(interrupted, 3, "sigterm")
    with pytest.raises(Interrupted):
        loop.Run(interrupted, corpus, loop.RunOptions(**options)).train()
    (tmp_path / "checkpoints" / "3" / "run" / "metadata").write_text('{"settings": {')
    warnings: list[str] = []
    # On another mesh: each array is read into the new layout.
    records, _ = trained(CONFIG, corpus, "fsdp=4", **options, warn=warnings.append)
    assert any("checkpoint 3 is damaged" in warning for warning in warnings)
    assert (tmp_path / "damaged_checkpoints").is_dir()
    np.testing.assert_allclose(losses(records), losses(one_device[0]), rtol=RTOL)


def test_resume_refuses_other_settings(corpus, tmp_path: Path) -> None:
    options = {"workdir": tmp_path, "checkpoint_every": 2}
    trained(CONFIG, corpus, "data=1", **options)
    other = train.Config(**{**vars(CONFIG), "learning_rate": 2e-2})
    with pytest.raises(SettingsMismatch, match="learning-rate"):
        trained(other, corpus, "data=1", **options)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mesh", "data=2"], "--mesh data=2,fsdp=1 has 2 devices, but the run has 8"),
        (["--mesh", "data=2"], "(XLA_FLAGS='--xla_force_host_platform_device_count=8"),
        (["--mesh", "data=2,tp=4"], "--mesh data=2,tp=4: expected AXIS=SIZE pairs"),
        (["--mesh", "fsdp=8", "--batch-size", "12"], "--batch-size 12 does not split over"),
        (["--data", "/no/such/corpus"], "--data /no/such/corpus: no such file or folder"),
        (["--optimizer", "adamq"], "--optimizer adamq: not in the registry"),
        (["--opt", "b3=0.9"], "--opt b3: adamw has no such option"),
        (["--opt", "b2=1.5"], "--opt: "),
        (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
        (["--optimizer", "adamax", "--moments", "8bit"], "--moments, --second-moment: "),
        (["--resume"], "--resume needs --workdir"),
        (["--restart"], "--restart needs --workdir"),
        (["--opt", "b2=abc"], "--opt b2=abc: expected a number (the default is 0.95)"),
        (
            ["--optimizer", "soap", "--opt", "block_size=16", "--opt", "block_axis=model"],
            "--opt block_axis=model: expected an axis of the mesh (data, fsdp) or None",
        ),
        (["--checkpoint-every", "0"], "--checkpoint-every must be an integer >= 1, got 0"),
        (["--seq-len", "4000", "--data", "SMALL"], "too short for --seq-len 4000"),
        (["--grad-accumulation", "0"], "--grad-accumulation must be an integer >= 1, got 0"),
        (
            ["--batch-size", "32", "--grad-accumulation", "3"],
            "--batch-size 32 does not split into --grad-accumulation 3 micro-batches",
        ),
        (
            ["--mesh", "data=8", "--batch-size", "16", "--grad-accumulation", "4"],
            "--batch-size 16 / --grad-accumulation 4 = 4 windows a micro-batch, which do not "
            "split over the 8 devices of --mesh data=8,fsdp=1: give a batch size that is a "
            "multiple of 32",
        ),
    ],
)
def test_bad_flags_are_one_line(flags, message, text: Path, tmp_path: Path, capsys) -> None:
    small = tmp_path / "small.txt"
    small.write_text("x" * 1000)
    flags = [str(small) if flag == "SMALL" else flag for flag in flags]
    with pytest.raises(SystemExit) as stopped:
        main.main(["--data", str(text), "--steps", "1", *flags])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.splitlines()
    assert error[0].startswith("python -m examples.lm: error: ")
    assert message in error[0]


@pytest.mark.parametrize("workdir", ["FILE", "FILE/run"])
def test_a_bad_workdir_is_refused_before_set_up(workdir, tmp_path: Path, capsys, monkeypatch):
    """A file, or a folder that cannot be made: one line and exit status 2, as for a bad flag,
    before the corpus is read."""
    file = tmp_path / "file"
    file.write_text("")
    monkeypatch.setattr(data, "load", lambda path: pytest.fail("the set-up began"))
    with pytest.raises(SystemExit) as stopped:
        main.main(["--workdir", workdir.replace("FILE", str(file))])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.splitlines()[0]
    assert error in (
        f"python -m examples.lm: error: --workdir {file} is a file, not a folder",
        f"python -m examples.lm: error: --workdir {file}/run: cannot make the folder ({file} is "
        "a file)",
    )


def test_the_launcher_refuses_a_bad_option_once_and_prints_no_resume_command(
    tmp_path: Path,
) -> None:
    """A bad option or workdir is refused before any process starts; a mesh that the device
    count that XLA_FLAGS fixes does not fit, once the processes have started, is said by the
    first."""
    file = tmp_path / "file"
    file.write_text("")
    launcher = [sys.executable, "-m", "examples.lm.launch", "--num-processes", "2"]
    for flags, environment in [
        (["--mesh", "data=2,fsdp=4", "--workdir", str(file)], {}),
        (["--optimizer", "adamq", "--workdir", str(tmp_path / "run")], {}),
        (
            ["--mesh", "data=2,fsdp=4", "--workdir", str(tmp_path / "run")],
            {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
        ),
    ]:
        ended = subprocess.run(
            [*launcher, *flags],
            cwd=REPO_ROOT,
            env={**os.environ, **environment},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert ended.returncode == 2, ended.stderr
        assert ended.stderr.count("error: ") == 1, ended.stderr
        assert "resume" not in ended.stderr.lower(), ended.stderr
    assert "(XLA_FLAGS='--xla_force_host_platform_device_count=8' fixes" in ended.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mesh", "data=3", "--num-processes", "2"], "--num-processes 2 does not divide"),
        (["--cluster", "--num-processes", "2"], "--cluster finds the processes itself"),
    ],
)
def test_process_flags_are_checked_before_jax_starts(flags, message, capsys) -> None:
    with pytest.raises(SystemExit):
        main.prepare([*flags, "--process-id", "0", "--coordinator", "127.0.0.1:1"])
    assert message in capsys.readouterr().err


def test_folder_corpus_skips_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("bb")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("aa")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "c").write_text("cc")
    assert bytes(data.load(tmp_path)) == b"bb\naa"


def test_held_out_windows_stay_in_the_last_tenth() -> None:
    stream = np.arange(1000, dtype=np.int64) % 251
    corpus = data.Corpus(stream.astype(np.uint8), seq_len=9)
    windows = corpus.windows(corpus.held_out_starts(5), held_out=True)
    assert windows.shape == (5, 10)
    assert windows[0, 0] == stream[900] and windows[-1, -1] == stream[-1]
    train_windows = corpus.windows(corpus.batches(0, 50, 4))
    assert train_windows.max() <= stream[:900].max() and train_windows.shape == (50, 4, 10)


# The command line in this process (its mesh: the 8 devices as data), for the long-run tests:
# all of them the same program, compiled once.
TINY_FLAGS = ["--batch-size", "8", "--eval-every", "2", "--eval-windows", "8", "--layers", "1",
              "--d-model", "32", "--heads", "2", "--seq-len", "16", "--learning-rate", "1e-2",
              "--steps", "6", "--checkpoint-every", "3"]  # fmt: skip


def crash_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """Makes every trainer raise once ``steps`` steps are done, leaving the files as
    ``kill -9`` would (the last checkpoint being the newest)."""
    step, done = train.Trainer.step, []

    def counted(self: train.Trainer, windows: np.ndarray) -> None:
        if len(done) == steps:
            raise RuntimeError("killed")
        step(self, windows)
        done.append(1)

    monkeypatch.setattr(train.Trainer, "step", counted)


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(path.name) for path in (workdir / "checkpoints").iterdir())


def records_of(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{**json.loads(line), "tokens_per_second": None} for line in lines]


def digest_of(workdir: Path, step: int) -> str:
    return json.loads((workdir / "checkpoints" / str(step) / "run" / "metadata").read_text())[
        "digest"
    ]


@pytest.fixture(scope="module")
def unbroken(text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The work directory of the command line's run of TINY_FLAGS, not interrupted."""
    workdir = tmp_path_factory.mktemp("unbroken")
    main.main(["--data", str(text), *TINY_FLAGS, "--workdir", str(workdir)])
    return workdir


def test_the_same_command_resumes_after_a_kill(
    text: Path, unbroken: Path, tmp_path: Path, capsys
) -> None:
    """What a requeued job does: the command that was killed, run again, continues from the
    newest checkpoint and ends as the unbroken run does, bit for bit."""
    argv = ["--data", str(text), *TINY_FLAGS]
    requeued = tmp_path / "requeued"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError, match="killed"):
        crash_after(patch, 5)
        main.main([*argv, "--workdir", str(requeued)])
    assert checkpoint_steps(requeued) == [3]
    capsys.readouterr()
    main.main([*argv, "--workdir", str(requeued)])
    assert "resuming from step 3 of 6" in capsys.readouterr().out
    assert records_of(requeued) == records_of(unbroken)
    assert [record["step"] for record in records_of(requeued)] == [2, 4, 6]
    assert digest_of(requeued, 6) == digest_of(unbroken, 6)


def test_restart_keeps_the_previous_run_until_its_first_checkpoint(
    text: Path, unbroken: Path, tmp_path: Path, capsys
) -> None:
    shutil.copytree(unbroken, tmp_path, dirs_exist_ok=True)
    argv = ["--data", str(text), *TINY_FLAGS, "--workdir", str(tmp_path)]
    previous = (tmp_path / "metrics.jsonl").read_text()
    assert checkpoint_steps(tmp_path) == [3, 6]
    # Other settings are refused as any bad flag is (one line, exit status 2)...
    capsys.readouterr()
    other = [*argv, "--seed", "1"]
    with pytest.raises(SystemExit) as refused:
        main.main(other)
    assert refused.value.code == 2
    (error,) = capsys.readouterr().err.splitlines()
    assert "cannot resume: the checkpoint of step 6 was written with --seed 0" in error
    assert "add --restart to start over" in error
    # ...and taken with --restart, which keeps the previous run's files until its first save:
    # killed before it, nothing has changed (the next run deletes what it wrote aside).
    with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError, match="killed"):
        crash_after(patch, 2)
        main.main([*other, "--restart"])
    assert checkpoint_steps(tmp_path) == [3, 6]
    assert (tmp_path / "metrics.jsonl").read_text() == previous
    assert "stay until this run's first checkpoint (step 3)" in capsys.readouterr().out
    # Killed after it: the new run's files alone, from which its command continues.
    with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError, match="killed"):
        crash_after(patch, 3)
        main.main([*other, "--restart"])
    assert checkpoint_steps(tmp_path) == [3]
    (new,) = records_of(tmp_path)
    assert new["step"] == 2  # a record of the new run (another seed):
    assert new["train_loss"] != json.loads(previous.splitlines()[0])["train_loss"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoints", "metrics.jsonl"]
    capsys.readouterr()
    main.main(other)
    assert "resuming from step 3 of 6" in capsys.readouterr().out
    assert checkpoint_steps(tmp_path) == [3, 6]


def test_an_interrupted_run_draws_its_curves_and_names_the_resume_command(
    text: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    argv = ["--data", str(text), *TINY_FLAGS, "--workdir", str(tmp_path), "--restart"]
    step, done = train.Trainer.step, []

    def signalled(self: train.Trainer, windows: np.ndarray) -> None:
        step(self, windows)
        done.append(1)
        if len(done) == 3:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(train.Trainer, "step", signalled)
    with pytest.raises(SystemExit) as stopped:
        main.main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    stop, resume = capsys.readouterr().err.splitlines()
    assert stop.startswith("python -m examples.lm: stopped by SIGTERM after step 3 (of 6)")
    assert resume.startswith(f"Resume with: {launch.interpreter()} -m examples.lm --data")
    assert resume.endswith("--workdir " + str(tmp_path) + " --resume")  # not --restart
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert checkpoint_steps(tmp_path) == [3]


def test_the_progress_bar_moves_every_step(text: Path, monkeypatch) -> None:
    """Between records (here only at the last step) the bar counts the steps, one by one."""
    from rich.progress import Progress

    from examples.mnist import console

    counts: list[int] = []

    class Bar(Progress):
        def update(self, task_id, **fields) -> None:  # type: ignore[override]
            if "completed" in fields:
                counts.append(fields["completed"])
            super().update(task_id, **fields)

    monkeypatch.setattr(console, "progress_bar", lambda enabled, where: Bar(console=where))
    main.main(["--data", str(text), *TINY_FLAGS, "--eval-every", "6"])
    assert counts[:6] == [1, 2, 3, 4, 5, 6]


def test_a_stopped_run_without_workdir_prints_no_resume_command(
    text: Path, capsys, monkeypatch
) -> None:
    step = train.Trainer.step

    def signalled(self: train.Trainer, windows: np.ndarray) -> None:
        step(self, windows)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(train.Trainer, "step", signalled)
    with pytest.raises(SystemExit) as stopped:
        main.main(["--data", str(text), *TINY_FLAGS])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.splitlines() == [
        "python -m examples.lm: stopped by SIGTERM after step 1 (of 6); there is no checkpoint",
        "Without --workdir there is no checkpoint to resume from; add --workdir DIR to keep them",
    ]


def test_printed_commands_name_this_python_as_it_runs(monkeypatch) -> None:
    """``python`` where that is this interpreter on PATH, else a path that runs as printed."""
    monkeypatch.setenv("PATH", "")
    alone = launch.interpreter()
    assert alone != "python"
    ran = subprocess.run([alone, "-c", "import jax, sys; print(sys.executable)"], text=True,
                         capture_output=True, timeout=60)  # fmt: skip
    assert ran.returncode == 0 and ran.stdout.strip() == sys.executable, ran.stderr
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))
    if os.path.basename(sys.executable) == "python":
        assert launch.interpreter() == "python"


def test_checkpoints_every_n_steps_whatever_eval_every(corpus, tmp_path: Path, monkeypatch):
    saved: list[int] = []
    save = loop.Checkpoints.save

    def spied(self, step: int, tree, run) -> bool:
        saved.append(step)
        return save(self, step, tree, run)

    monkeypatch.setattr(loop.Checkpoints, "save", spied)
    config = train.Config(**{**vars(CONFIG), "eval_every": 4})  # the same step as CONFIG's
    records, _ = trained(config, corpus, "data=1", workdir=tmp_path, checkpoint_every=1)
    assert saved == [1, 2, 3, 4]
    assert [record["step"] for record in records] == [4]


def test_sigterm_stops_after_the_step_in_flight(corpus, tmp_path: Path) -> None:
    """A signal from elsewhere, at a moment the program does not choose: the checkpoint is
    of the step that was running then (at most one past the steps done)."""
    config = train.Config(**{**vars(CONFIG), "steps": 400, "eval_every": 100})
    trainer = trainer_on("data=1", config)
    run = loop.Run(trainer, corpus, loop.RunOptions(workdir=tmp_path, checkpoint_every=1000))
    done: list[tuple[float, int]] = []  # (when, steps done), as the loop learns it
    sent: list[float] = []
    wait = trainer.wait

    def send() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    def timed_wait() -> None:
        wait()
        done.append((time.monotonic(), run.step))
        if run.step == 20:
            threading.Thread(target=send).start()

    trainer.wait = timed_wait  # type: ignore[method-assign]
    with pytest.raises(Interrupted) as stop:
        run.train()
    steps_done = max(steps for when, steps in done if when <= sent[0])
    assert stop.value.checkpoint_step == stop.value.step <= steps_done + 1
    assert checkpoint_steps(tmp_path) == [stop.value.step]


def parser_of(program: Callable[[], object]) -> argparse.ArgumentParser:
    """The parser that ``program()`` builds, stopped where it would parse."""

    class Built(Exception):
        pass

    def built(self: argparse.ArgumentParser, *args, **kwargs) -> NoReturn:
        raise Built(self)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Built) as stopped:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", built)
        program()
    return stopped.value.args[0]


@pytest.mark.parametrize("program", ["lm", "lm.launch", "mnist", "mnist.launch", "mnist_minimal"])
def test_help_explains_each_option_and_gives_each_default_once(program: str) -> None:
    from examples import mnist_minimal
    from examples.mnist import main as mnist_main

    parser = parser_of(
        {
            "lm": main.main,
            "lm.launch": lambda: launch.main([], program="examples.lm"),
            "mnist": mnist_main.main,
            "mnist.launch": lambda: launch.main([], program="examples.mnist"),
            "mnist_minimal": mnist_minimal.main,
        }[program]
    )
    assert parser.prog == f"python -m examples.{program}"
    text = parser.format_help()
    # The help of each option: its line (two spaces, then its flags) and the lines under it.
    entries = [" ".join(entry.split()) for entry in re.split(r"\n(?=  -)", text)[1:]]
    for entry in entries:
        assert entry.count("(default") + entry.count("(None") <= 1, entry
    for action in parser._actions:
        assert action.help, action.option_strings
        if action.option_strings and action.nargs != 0 and action.default not in (None, []):
            (entry,) = [e for e in entries if e.startswith(action.option_strings[0] + " ")]
            assert "(default" in entry, entry
    assert "(default: None)" not in text and "(default: False)" not in text
    if program == "mnist":
        assert "--train-limit N train on the first N images (None: all of them)" in entries


@pytest.mark.parametrize("dies", [0, 1])
def test_a_dead_process_is_named_and_the_others_end_within_15_s(
    dies: int, tmp_path: Path, capfd, monkeypatch
) -> None:
    """Two processes that wait for each other in collectives; one is killed (the first holds
    the coordination service). The launcher names it, how it ended and the resume command;
    the survivor ends on its own (the heartbeat timeout the programs set), not at the
    launcher's hand."""
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    monkeypatch.delenv("XLA_FLAGS")  # one device each
    record = tmp_path / "died"
    port = launch.free_port()
    worker = [sys.executable, str(REPO_ROOT / "tests" / "lm" / "dying_worker.py"), "--dies",
              str(dies), "--record", str(record), "--num-processes", "2", "--coordinator",
              f"127.0.0.1:{port}"]  # fmt: skip
    commands = [[*worker, "--process-id", str(i)] for i in range(2)]
    status = launch.run(commands, grace_seconds=60, resume="RESUME COMMAND", prog="launch")
    ended = time.monotonic()
    assert status == 128 + signal.SIGKILL
    assert ended - float(record.read_text()) < 15
    err = capfd.readouterr().err
    assert f"launch: process {dies} of 2 ended (killed by SIGKILL (exit status 137))" in err
    assert err.endswith("launch: resume with: RESUME COMMAND\n")
    if dies == 1:  # the first process, whose collective fails, says so (the second, when the
        # first dies, is ended by JAX at once, having lost the coordination service)
        assert "worker: process 0: another process stopped answering (a collective failed: " in err
        assert "Resume with: RESUME COMMAND" in err


@pytest.mark.slow
@pytest.mark.parametrize("dies", [0, 1])
def test_a_process_killed_on_the_documented_mesh_leaves_one_line_for_the_survivor(
    dies: int, text: Path, tmp_path: Path, capfd, monkeypatch
) -> None:
    """The launcher's run on ``--mesh data=2,fsdp=4`` (4 host devices a process), one process
    killed with ``kill -9`` after its step 2 (process 0 holds the coordination service). JAX's
    distributed runtime ends the survivor with C++ log lines and a stack trace; the output
    instead names the dead process, the survivor and the resume command in one line each,
    within 15 s, and holds no piece of gloo's connection lines."""
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    monkeypatch.delenv("XLA_FLAGS")  # each process asks for the 4 devices it brings
    record = tmp_path / "killed_at"
    flags = ["--mesh", "data=2,fsdp=4", "--data", str(text), "--steps", "1000", "--batch-size",
             "8", "--eval-every", "1000", "--layers", "1", "--d-model", "32", "--heads", "2",
             "--seq-len", "16"]  # fmt: skip
    signalled = [sys.executable, str(REPO_ROOT / "tests" / "lm" / "signalled_process.py"),
                 str(dies), "2", "SIGKILL", str(record)]  # fmt: skip
    processes = launch.commands(2, flags, launch.free_port(), "examples.lm")
    processes = [[*signalled, *command[3:]] for command in processes]  # less python -m PROGRAM
    assert launch.run(processes, grace_seconds=10, resume="RESUME", prog="launch") == 137
    assert time.monotonic() - float(record.read_text()) < 15
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert len(lines) == 3, err
    assert lines[0].startswith(f"launch: process {dies} of 2 ended (killed by SIGKILL (exit ")
    survivor = 1 - dies
    named_by_launcher = [
        f"launch: process {survivor} of 2 stopped: JAX's distributed runtime reported process "
        f"{dies} gone (its C++ log left out)",
        # where neither the runtime nor a collective ends it in the grace period (a busy machine)
        f"launch: process {survivor} of 2 killed, still running 10 s after process {dies} ended",
    ]
    # where the survivor's collective fails first, it says so itself
    said_itself = f"python -m examples.lm: process {survivor}: another process stopped answering"
    assert lines[1] in named_by_launcher or lines[1].startswith(said_itself), err
    assert lines[2] == "launch: resume with: RESUME"
    assert "[Gloo]" not in out and "peer ranks" not in out, out


def test_gloos_interleaved_connection_lines_are_recognized() -> None:
    """Pieces of gloo's lines, as device threads writing at once leave them, and nothing
    else."""
    for line in [
        b"[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer "
        b"ranks is : 1\n",
        b"[Gloo] Rank [Gloo] Rank 1 is connected to 3 peer ranks. \n",
        b"1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n",
        b" peer ranks. Expected number of connected peer ranks is : 7\n",
    ]:
        assert distributed.GLOO_PIECES.fullmatch(line), line
    for line in [b"step 10/100\n", b"[Gloo] Rank 0 failed: Connection reset by peer\n"]:
        assert not distributed.GLOO_PIECES.fullmatch(line), line


def test_the_launcher_names_a_survivor_that_jaxs_runtime_aborts(capfd) -> None:
    """A process that dies, and one that JAX's distributed runtime then aborts with its C++
    report (logged errors, a stack trace, SIGABRT): the report is one line naming both; the
    report of a runtime error that no other process's death explains is kept."""
    report = (
        "import os, sys, time; time.sleep(0.5); sys.stderr.write('before\\n'); sys.stderr.write("
        "'E1127 18:54:40.516486    4139 coordination_service_agent.cc:289] Polled an error\\n"
        "F1127 18:54:40.516751    4139 client.h:80] Terminating process\\n"
        "*** Check failure stack trace: ***\\n    @     0x7f348f020634  absl::SendToLog()\\n'); "
        "sys.stderr.flush(); os.abort()"
    )
    dies = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    aborted = [sys.executable, "-c", report]
    assert launch.run([aborted, dies], grace_seconds=10, resume="RESUME", prog="launch") == 137
    lines = capfd.readouterr().err.splitlines()
    assert lines.count("before") == 1  # what came before the runtime's error, as it came
    ended, *rest = [line for line in lines if line != "before"]
    assert ended.startswith("launch: process 1 of 2 ended (killed by SIGKILL (exit status 137))")
    assert rest == [
        "launch: process 0 of 2 stopped: JAX's distributed runtime reported process 1 gone "
        "(its C++ log left out)",
        "launch: resume with: RESUME",
    ]
    assert launch.run([aborted], grace_seconds=10, prog="launch") == 128 + signal.SIGABRT
    err = capfd.readouterr().err
    assert "Terminating process" in err and "Check failure stack trace" in err
