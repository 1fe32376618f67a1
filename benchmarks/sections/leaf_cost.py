"""``leaf_cost``: where a tree's per-leaf cost goes: kernels, the host's arguments, the step.

Trees of 1 x 16M, 100 x 160k and 1000 x 16k float32 elements (16M params, as in ``steps``);
on each, the jitted donating steps of ``optax.adam`` and ``adam_jax.adam`` on the tree, of
``adam_jax.adam`` on flat params (``adam_jax.flat``; the gradient arrives flat), and two
no-ops that take the same arguments as the tree's and the flat params' steps (params,
gradients, state: every buffer, ``keep_unused``) and return the params and state, donated, so
that the compiled program aliases them and computes nothing: the host's cost of a call with
those arguments. All are timed in the same rounds (interleaved). Each row has:

* ``kernels``: the launches of the compiled program as its optimized HLO states them
  (``jit(step).lower(...).compile().as_text()``): every instruction that computes (a fusion,
  a custom call, any unfused op) in the entry computation and in what it runs in turn
  (command buffers, loop bodies, branches), none inside a fusion; ``fusions`` and
  ``custom_calls`` of them apart, ``opcodes`` by name;
* ``num_args``: the buffers the call hands over (4 a leaf for Adam on a tree, and the count);
* ``median_ms``: from the call until its outputs are ready; ``dispatch_ms``: until the call
  returns (where the device runs asynchronously, the host's part: the arguments, the launches);
* ``noop_ms`` and ``noop_share`` (optimizer rows): the matching no-op's median, and the median
  over rounds of its time over the step's in the same round;
* ``us_per_leaf``: ``median_ms`` per leaf of the tree; ``us_per_kernel`` (optimizer rows): the
  step's median less the no-op's, per kernel.

A step of many leaves that costs about its ``kernels`` times a launch is launch-bound; one whose
no-op takes most of its time is bound by the host's handling of its arguments.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import optax

import adam_jax
from adam_jax import flat
from benchmarks.harness import LR, Row, Runner, Settings, Step, adam_step, copy_tree, interleaved
from benchmarks.hlo_program import kernel_counts
from benchmarks.models import params_and_grads

TREES = ((1, 16_000_000), (100, 160_000), (1000, 16_000))
QUICK_TREES = ((1, 16_000), (10, 1_600))
REPEATS = 20
WARMUP = 2
NOOP_TREE = "no-op, tree"
NOOP_FLAT = "no-op, flat params"
FLAT = "adam_jax.adam flat params"


def noop_step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
    """Takes a step's arguments and returns its params and state as they are."""
    del grads
    return params, state


class TimedRunner(Runner):
    """A :class:`Runner` whose call hands over every argument, read or not (``keep_unused``),
    and that also keeps when each call returned (``dispatch``, warm-up calls included), the
    compiled program's kernel counts and its compile time."""

    def __init__(self, name: str, step: Step, params: Any, grads: Any, state: Any):
        super().__init__(name, step, params, grads, state)
        self.fn = jax.jit(step, donate_argnums=(0, 2), keep_unused=True)
        self.dispatch: list[float] = []
        self.num_args = len(jax.tree.leaves((params, grads, state)))
        start = time.perf_counter()
        compiled = self.fn.lower(params, grads, state).compile()
        self.compile_s = time.perf_counter() - start
        self.counts = kernel_counts(compiled.as_text())

    def __call__(self) -> tuple[float, int]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        self.params, self.state = self.fn(self.params, self.grads, self.state)
        returned = time.perf_counter()
        jax.block_until_ready((self.params, self.state))
        seconds = time.perf_counter() - start
        self.dispatch.append(returned - start)
        return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def _runners(num_leaves: int, leaf_size: int) -> list[TimedRunner]:
    params, grads = params_and_grads(num_leaves, leaf_size)
    flat_params = flat.flatten(params)
    flat_grads = flat_params.layout.flatten(grads)
    runners = []
    for name, tx in (("optax.adam", optax.adam(LR)), ("adam_jax.adam", adam_jax.adam(LR))):
        mine = copy_tree(params)
        runners.append(TimedRunner(name, adam_step(tx), mine, grads, tx.init(mine)))
    tx = adam_jax.adam(LR)
    runners.append(TimedRunner(FLAT, adam_step(tx), flat_params, flat_grads, tx.init(flat_params)))
    for name, like in ((NOOP_TREE, runners[1]), (NOOP_FLAT, runners[2])):
        mine = copy_tree((like.params, like.state))
        runners.append(TimedRunner(name, noop_step, mine[0], like.grads, mine[1]))
    return runners


def measure(trees: Sequence[tuple[int, int]], repeats: int, settings: Settings) -> list[Row]:
    rows = []
    for num_leaves, leaf_size in trees:
        runners = _runners(num_leaves, leaf_size)
        interleaved(runners, repeats, warmup=WARMUP)
        by_name = {runner.name: runner for runner in runners}
        for runner in runners:
            dispatch = runner.dispatch[WARMUP:]
            row: Row = {
                "tree": f"{num_leaves} x {leaf_size}",
                "num_leaves": num_leaves,
                "leaf_size": leaf_size,
                "variant": runner.name,
                **runner.counts,
                "num_args": runner.num_args,
                "compile_s": runner.compile_s,
                "median_ms": 1e3 * runner.median,
                "min_ms": 1e3 * min(runner.times),
                "dispatch_ms": 1e3 * statistics.median(dispatch),
                "us_per_leaf": 1e6 * runner.median / num_leaves,
                "repeats": len(runner.times),
            }
            if not runner.name.startswith("no-op"):
                noop = by_name[NOOP_FLAT if runner.name == FLAT else NOOP_TREE]
                row["noop_ms"] = 1e3 * noop.median
                row["noop_share"] = statistics.median(
                    theirs / ours for ours, theirs in zip(runner.times, noop.times, strict=True)
                )
                row["us_per_kernel"] = 1e6 * (runner.median - noop.median) / row["kernels"]
            rows.append(row)
            settings.finished.append(row)
            share = f"  no-op x{row['noop_share']:.2f}" if "noop_share" in row else ""
            print(
                f"  {num_leaves:5d} x {leaf_size:9d} {runner.name:26s} "
                f"{row['kernels']:5d} kernels ({row['fusions']} fusions, "
                f"{row['custom_calls']} custom calls) {row['num_args']:5d} args "
                f"{row['median_ms']:9.3f} ms (dispatch {row['dispatch_ms']:8.3f}){share}",
                flush=True,
            )
        for runner in runners:
            runner.release()
    return rows


def run(settings: Settings) -> list[Row]:
    trees = QUICK_TREES if settings.quick else TREES
    return measure(trees, settings.repeats_or(REPEATS), settings)
