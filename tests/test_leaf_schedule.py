"""The leaf schedule: the core hands each leaf's step to the schedule given as the extra
argument ``leaf_schedule``, once a leaf and in order, through optax's wrappers and the
library's own; the core imports no module that schedules memory, and the fused 8-bit kernel
imports no rule."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import adam_jax
from adam_jax.rules import LeafSchedule, LeafStep, WholeLeaves

SOURCES = Path(adam_jax.__file__).parent / "_src"
PARAMS = {
    "a": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
    "b": jnp.arange(5.0) / 7,
    "c": {"d": jnp.full((2, 2), 0.25)},
}


class Recording(LeafSchedule):
    """Records each leaf it is handed (its position and gradient's shape), then steps it whole."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, tuple[int, ...]]] = []
        self.inner = WholeLeaves()

    def step(self, leaf: LeafStep, carry: Any) -> tuple[jax.Array, list[Any], Any]:
        self.seen.append((leaf.position, tuple(leaf.grad.shape)))
        return self.inner.step(leaf, carry)

    def around(self, schedule: LeafSchedule) -> LeafSchedule:
        return schedule


def _grads() -> Any:
    return jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.1, PARAMS)


def _in_order() -> list[tuple[int, tuple[int, ...]]]:
    return [(i, tuple(p.shape)) for i, p in enumerate(jax.tree.leaves(PARAMS))]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: adam_jax.adamw(1e-2, weight_decay=0.1), id="adamw"),
        pytest.param(
            lambda: optax.chain(optax.clip_by_global_norm(1.0), adam_jax.adamw(1e-2)),
            id="optax.chain",
        ),
        pytest.param(
            lambda: optax.inject_hyperparams(adam_jax.adamw)(learning_rate=1e-2), id="inject"
        ),
        pytest.param(lambda: adam_jax.mars(1e-2), id="mars"),
        pytest.param(lambda: adam_jax.adamw_8bit(1e-2), id="8-bit"),
    ],
)
def test_the_core_hands_each_leaf_to_the_schedule_once_in_order(make):
    tx = make()
    state = tx.init(PARAMS)
    recording = Recording()
    scheduled = tx.update(_grads(), state, PARAMS, leaf_schedule=recording)
    assert recording.seen == _in_order()
    # The default schedule's values, bit for bit.
    chex.assert_trees_all_equal(scheduled, tx.update(_grads(), state, PARAMS))


def test_soap_passes_the_schedule_to_each_branch_of_its_step():
    tx = adam_jax.soap(1e-2, precondition_frequency=2)
    recording = Recording()
    state = tx.init(PARAMS)
    step = lambda g, s, p: tx.update(g, s, p, leaf_schedule=recording)  # noqa: E731
    scheduled = jax.jit(step)(_grads(), state, PARAMS)
    # One lax.switch over the step's phases: each branch steps every leaf in order.
    leaves = _in_order()
    assert len(recording.seen) % len(leaves) == 0 and recording.seen
    assert recording.seen == leaves * (len(recording.seen) // len(leaves))
    chex.assert_trees_all_equal(scheduled, jax.jit(tx.update)(_grads(), state, PARAMS))


def test_step_in_slices_and_offload_compose_in_either_order():
    params = {"w": jnp.linspace(-1.0, 1.0, 64 * 128).reshape(128, 64), "b": jnp.ones(3)}
    grads = jax.tree.map(lambda p: jnp.sin(p) + 0.2, params)

    def run(tx: optax.GradientTransformation) -> Any:
        return jax.jit(tx.update)(grads, tx.init(params), params)

    inner = lambda: adam_jax.adamw_8bit(1e-2, min_size=16)  # noqa: E731
    want = run(inner())
    for tx in (
        adam_jax.offload_state(adam_jax.step_in_slices(inner(), 1024)),
        adam_jax.step_in_slices(adam_jax.offload_state(inner()), 1024),
        adam_jax.step_in_slices(adam_jax.step_in_slices(inner(), 1024), 4096),
    ):
        chex.assert_trees_all_equal(run(tx), want)


def _imports(path: Path) -> set[str]:
    """Every module a source file imports, at its top or inside its functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_core_imports_no_module_that_schedules_memory_or_runs_a_kernel():
    imported = _imports(SOURCES / "rule.py")
    for module in ("offload", "row_slices", "quantization.fused", "quantization"):
        assert f"adam_jax._src.{module}" not in imported, module
    # No context variable tells the core anything: the schedule is an argument.
    for path in SOURCES.rglob("*.py"):
        assert "contextvars" not in _imports(path), path


def test_the_fused_kernel_imports_no_rule():
    imported = _imports(SOURCES / "quantization" / "fused.py")
    assert not {
        m for m in imported if m.startswith(("adam_jax._src.rule", "adam_jax._src.moments"))
    }
