"""The most optimizer-state bytes a step can hold on the device at once, whatever order XLA
runs it in.

:func:`adam_jax.offload_state` keeps the state in host memory and brings it to the device leaf
by leaf. What XLA may do with the program it is given is bounded only by the data dependencies
(``optimization_barrier`` included), so the claim "one leaf's state at a time" is checked over
every order those allow, not over the one a compiler picked: :func:`most_state_bytes` reads the
lowered StableHLO of a step (for an H100: ``jax.jit(step).lower(...)`` on the
:mod:`benchmarks.accelerators` devices) and answers the question exactly as posed below.

**State on the device.** A *state buffer* is a non-scalar array that is either the device copy
of an array brought from host memory (the result of an ``annotate_device_placement`` to
``"device"``) or an array sent to host memory (the operand of one to ``"pinned_host"``), with
the values that are the same buffer: an ``optimization_barrier``'s or a ``while`` loop's result
is its operand's buffer (XLA updates a loop's carried arrays in place), and so is a
``dynamic_update_slice``'s (written in place where nothing reads the operand after it). A
buffer is held from the operation that defines it until the last operation that reads it has
run.

**Every order, every fusion.** Calls are inlined and every other operation is one node of the
dependency graph. XLA may fuse a chain of operations into one kernel, which holds all its inputs
and outputs at once; it cannot fuse across a *cut*: an ``optimization_barrier``, a custom call
(a host transfer among them), a loop or a conditional. So buffer ``a`` is surely freed before
buffer ``b`` exists when every reader of ``a`` is a strict ancestor of a cut that is ``b``'s
definition or an ancestor of it. That relation is a partial order, and a set of buffers that may
be held at once (in some order, with some fusion) is a set of pairwise unordered ones: an
antichain. The most bytes at once is the heaviest antichain, which weighted Dilworth's theorem
turns into a flow problem: in the bipartite network ``source -> a_out`` (capacity ``w(a)``),
``a_out -> b_in`` for ``a`` before ``b`` (unbounded), ``b_in -> sink`` (``w(b)``), the heaviest
antichain weighs ``sum(w) - max flow`` (the least cover by chains), and the buffers ``a`` whose
``a_out`` the source reaches in the residual network while ``a_in`` it does not form one.
``scipy.sparse.csgraph.maximum_flow`` solves it in well under a second at GPT-2 small's 148
leaves. The answer errs high where a buffer's readers each precede a different later buffer,
or where no kernel would in fact join two operations; it errs low only where XLA copies a
loop's or a ``dynamic_update_slice``'s operand instead of updating it in place (it does so
when the operand is read again afterwards).

    python -m benchmarks.state_residency --tree gpt2     # the offloaded steps at GPT-2 small
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

_RESULTS = re.compile(r"^\s*(%[\w.$-]+)(?::(\d+))? = ")
_VALUE = re.compile(r"%[\w.$-]+(?:#\d+)?")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_CALL = re.compile(r"\b(?:func\.)?call @([\w.$-]+)\(")
_PLACEMENT = re.compile(r'_xla_buffer_placement = "(\w+)"')
_CUT = re.compile(r"stablehlo\.(?:custom_call|case|if)\b")
_TENSOR = re.compile(r"tensor<((?:\d+x)*)(\w+)>")
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "ui64": 8, "i32": 4, "ui32": 4,
          "i16": 2, "ui16": 2, "i8": 1, "ui8": 1, "i1": 1, "f8E4M3FN": 1, "f8E5M2": 1}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Op:
    results: tuple[str, ...]
    operands: tuple[str, ...]
    text: str  # the operation's first line, strings kept
    callee: str | None


def _functions(text: str) -> dict[str, tuple[list[str], list[_Op], list[str]]]:
    """Each function's argument names, top-level operations and returned values."""
    functions: dict[str, tuple[list[str], list[_Op], list[str]]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^\s*func\.func (?:public |private )?@([\w.$-]+)\(", lines[i])
        if not match:
            i += 1
            continue
        name = match.group(1)
        header = _STRING.sub('""', lines[i])
        args = re.findall(r"(%arg\d+):", header)
        ops: list[_Op] = []
        returned: list[str] = []
        i += 1
        depth = 0
        current: list[str] = []
        while i < len(lines):
            line = lines[i]
            bare = _STRING.sub('""', line)
            if depth == 0 and bare.strip() == "}":
                break
            current.append(line)
            depth += bare.count("{") - bare.count("}")
            if depth == 0:
                op_text = "\n".join(current)
                current = []
                first = _STRING.sub('""', op_text)
                if re.match(r"^\s*(?:func\.)?return\b|^\s*stablehlo\.return\b", first):
                    returned = _VALUE.findall(first)
                else:
                    ops.append(_parse_op(op_text))
            i += 1
        functions[name] = (args, ops, returned)
        i += 1
    return functions


def _parse_op(text: str) -> _Op:
    bare = _STRING.sub('""', text)
    match = _RESULTS.match(bare)
    results: tuple[str, ...] = ()
    body = bare
    if match:
        name, count = match.group(1), match.group(2)
        results = tuple(f"{name}#{k}" for k in range(int(count))) if count else (name,)
        body = bare[match.end() :]
    call = _CALL.search(body.splitlines()[0])
    # Values a region defines are not operands; the caller keeps only names already defined.
    return _Op(results, tuple(_VALUE.findall(body)), text.splitlines()[0], call and call.group(1))


def _nbytes(type_text: str) -> int:
    match = _TENSOR.search(type_text)
    if not match or not match.group(1):
        return 0  # a scalar
    dims = [int(d) for d in match.group(1).rstrip("x").split("x")]
    return math.prod(dims) * _BYTES.get(match.group(2), 4)


@dataclasses.dataclass
class _Graph:
    readers: list[set[int]] = dataclasses.field(default_factory=list)  # node -> nodes it reads
    cuts: set[int] = dataclasses.field(default_factory=set)  # nodes no fusion crosses
    texts: list[str] = dataclasses.field(default_factory=list)  # each node's operation
    buffer_of: dict[int, int] = dataclasses.field(default_factory=dict)  # value id -> buffer
    node_of: dict[int, int] = dataclasses.field(default_factory=dict)  # value id -> its node
    definition: dict[int, int] = dataclasses.field(default_factory=dict)  # buffer -> node
    uses: dict[int, set[int]] = dataclasses.field(default_factory=dict)  # buffer -> nodes
    weight: dict[int, int] = dataclasses.field(default_factory=dict)  # state buffer -> bytes
    values: int = 0

    def new_value(self, node: int | None, alias_of: int | None = None) -> int:
        self.values += 1
        self.node_of[self.values] = -1 if node is None else node
        if alias_of is not None:
            self.buffer_of[self.values] = self.buffer_of[alias_of]
        else:
            self.buffer_of[self.values] = self.values
            self.definition[self.values] = -1 if node is None else node
            self.uses[self.values] = set()
        return self.values


def _build(functions: dict[str, tuple[list[str], list[_Op], list[str]]]) -> _Graph:
    graph = _Graph()

    def instantiate(name: str, arguments: list[int]) -> list[int]:
        args, ops, returned = functions[name]
        env = dict(zip(args, arguments, strict=True))
        for op in ops:
            operands = [env[v] for v in op.operands if v in env]
            if op.callee is not None:
                outputs = instantiate(op.callee, operands)
                env.update(zip(op.results, outputs, strict=True))
                continue
            node = len(graph.readers)
            graph.readers.append({graph.node_of[v] for v in operands} - {-1})
            graph.texts.append(op.text)
            for v in operands:
                graph.uses[graph.buffer_of[v]].add(node)
            barrier = "optimization_barrier" in op.text or "stablehlo.while" in op.text
            if barrier or _CUT.search(op.text):
                graph.cuts.add(node)
            in_place = barrier or "stablehlo.dynamic_update_slice" in op.text
            placement = _PLACEMENT.search(op.text)
            for k, result in enumerate(op.results):
                alias = operands[k] if in_place and k < len(operands) else None
                env[result] = graph.new_value(node, alias)
            if placement and "annotate_device_placement" in op.text:
                size = _nbytes(op.text.split("->")[-1])
                if size:
                    target = env[op.results[0]] if placement.group(1) == "device" else operands[0]
                    graph.weight[graph.buffer_of[target]] = size
        return [env[v] for v in returned]

    args = functions["main"][0]
    instantiate("main", [graph.new_value(None) for _ in args])
    return graph


def _after_a_cut(readers: list[set[int]], cuts: set[int]) -> list[int]:
    """For each node, the bitset of the nodes that come after it through a cut: a cut that
    (transitively) reads it, and every node that reads that cut."""
    children: list[list[int]] = [[] for _ in readers]
    for node, parents in enumerate(readers):
        for parent in parents:
            children[parent].append(node)
    below = [0] * len(readers)  # the node's strict descendants
    through = [0] * len(readers)
    for node in range(len(readers) - 1, -1, -1):
        bits = cut_bits = 0
        for child in children[node]:
            bits |= below[child] | (1 << child)
            cut_bits |= below[child] | (1 << child) if child in cuts else through[child]
        below[node], through[node] = bits, cut_bits
    return through


@dataclasses.dataclass(frozen=True)
class Residency:
    """The answer: the most state bytes held at once, and one set of buffers that holds them."""

    most_bytes: int
    buffers: tuple[int, ...]  # the state buffers' bytes, largest first
    num_state_buffers: int


def most_state_bytes(stablehlo: str) -> Residency:
    """The most bytes of state buffers any order of the program's operations holds on the
    device at once (see the module docstring)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow

    graph = _build(_functions(stablehlo))
    after_cut = _after_a_cut(graph.readers, graph.cuts)
    state = sorted(graph.weight)
    n = len(state)
    if not n:
        return Residency(0, (), 0)
    unit = 256  # maximum_flow takes int32 capacities: bytes in units of 256, rounded up
    weights = [math.ceil(graph.weight[b] / unit) for b in state]
    done_before = []
    for b in state:
        # A buffer nothing reads is freed once it is made.
        uses = graph.uses[b] or {graph.definition[b]} - {-1}
        common = ~0 if uses else 0
        for u in uses:
            common &= after_cut[u]
        done_before.append(common)
    source, sink = 2 * n, 2 * n + 1
    rows, cols, caps = [], [], []
    infinite = sum(weights) + 1
    for i in range(n):
        rows += [source, n + i]
        cols += [i, sink]
        caps += [weights[i], weights[i]]
        for j in range(n):
            definition = graph.definition[state[j]]
            if i != j and definition >= 0 and done_before[i] >> definition & 1:
                rows.append(i)
                cols.append(n + j)
                caps.append(infinite)
    capacity = csr_matrix((np.array(caps, np.int32), (rows, cols)), shape=(2 * n + 2, 2 * n + 2))
    flow = maximum_flow(capacity, source, sink).flow
    residual = (capacity - flow).tocsr()
    residual.eliminate_zeros()
    reached = _reachable(residual, source)
    chosen = [i for i in range(n) if i in reached and n + i not in reached]
    sizes = tuple(sorted((graph.weight[state[i]] for i in chosen), reverse=True))
    return Residency(sum(sizes), sizes, n)


def _reachable(residual: Any, start: int) -> set[int]:
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        for k in range(residual.indptr[node], residual.indptr[node + 1]):
            if residual.data[k] > 0 and residual.indices[k] not in seen:
                seen.add(int(residual.indices[k]))
                stack.append(int(residual.indices[k]))
    return seen


def _settings() -> dict[str, Any]:
    from benchmarks import programs

    eight_bit = programs.SETTINGS["offload_state(step_in_slices(adamw_8bit))"]
    return {
        "offload_state(adamw, leaf_by_leaf=False)": dataclasses.replace(
            programs.SETTINGS["offload_state(adamw)"], leaf_by_leaf=False
        ),
        "offload_state(step_in_slices(adamw_8bit), leaf_by_leaf=False)": dataclasses.replace(
            eight_bit, leaf_by_leaf=False
        ),
    }


def rows(tree: str, names: list[str]) -> Iterator[dict[str, Any]]:
    """For each program: the most state bytes at once, and the largest leaf's state."""
    from benchmarks import accelerators

    accelerators.enable()
    import jax

    from benchmarks import programs

    target = accelerators.TARGETS["h100"]
    settings = {**programs.SETTINGS, **_settings()}
    for name in names:
        setting = settings[name]
        fn, args, out_shardings, _ = programs.step_args(setting, tree, target)
        lowered = jax.jit(fn, donate_argnums=(0, 2), out_shardings=out_shardings).lower(*args)
        result = most_state_bytes(lowered.as_text())
        largest = programs.largest_leaf_state_bytes(setting, tree)
        yield {
            "program": name,
            "tree": tree,
            "most_bytes": result.most_bytes,
            "largest_leaf_state_bytes": largest,
            "ratio": result.most_bytes / largest,
            "buffers_held": list(result.buffers),
            "num_state_buffers": result.num_state_buffers,
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default="gpt2", choices=("small", "gpt2"))
    parser.add_argument("--programs", nargs="+", default=list(_PROGRAMS))
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args(argv)
    found = []
    for row in rows(args.tree, args.programs):
        found.append(row)
        print(
            f"{row['program']:62} {row['most_bytes'] / 2**20:8.1f} MiB at once, "
            f"{row['ratio']:.2f}x the largest leaf's state "
            f"({row['largest_leaf_state_bytes'] / 2**20:.1f} MiB)",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(found, indent=1) + "\n")


_PROGRAMS = (
    "offload_state(adamw)",
    "offload_state(adamw, leaf_by_leaf=False)",
    "offload_state(adamw_8bit)",
    "offload_state(step_in_slices(adamw_8bit))",
    "offload_state(step_in_slices(adamw_8bit), leaf_by_leaf=False)",
    "offload_state(adamw, prefetch=1)",
)


if __name__ == "__main__":
    main()
