"""What a compiled program does, read from its optimized HLO text.

``jax.jit(f).lower(...).compile().as_text()`` is the program XLA scheduled for its target after
all its passes: fusions, library calls, loops, branches, copies between memory spaces. This
module parses that text (no jax needed) and reports what a reader checks a step for:

* **kernels**: every instruction that launches work (a fusion, a custom call, a copy, any
  unfused op) in the entry computation and in what it runs in turn (loop bodies and conditions,
  branches, called computations), none inside a fusion; counted once each, as written;
* **fusions by kind** (``kLoop``, ``kInput``, ``kOutput``, ``kCustom`` with its backend kind
  such as ``__triton_nested_gemm_fusion``) and **custom calls by target** (cuBLAS, cuSOLVER,
  LAPACK, host-offload markers);
* **while loops** with their trip counts (known to XLA, or ``None``: a GPU then waits on the
  host at every pass to read the condition) and **conditionals** with what each branch holds;
* **copies** (``copy`` kernels), **host transfers** (asynchronous copies to or from host
  memory, XLA's memory space ``S(5)``) and **kernels on host memory** (a kernel that reads or
  writes an ``S(5)`` buffer in place, over the bus);
* each kernel's **bytes** (what it reads and writes of device or host memory: its operands and
  results, a slice where it reads one, only the update where it writes one in place) and its
  **FLOPs** of its dots and solver calls (and of them, those at float32's full precision:
  dots at ``HIGHEST``, solvers; and those under a bfloat16 dot algorithm, with its passes),
  for :mod:`benchmarks.time_model`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from typing import Any

#: Bytes of an element of each HLO primitive type (sub-byte types as fractions).
_ITEMSIZE = {
    "pred": 1.0,
    "s2": 0.25,
    "u2": 0.25,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1.0,
    "u8": 1.0,
    "s16": 2.0,
    "u16": 2.0,
    "f16": 2.0,
    "bf16": 2.0,
    "s32": 4.0,
    "u32": 4.0,
    "f32": 4.0,
    "s64": 8.0,
    "u64": 8.0,
    "f64": 8.0,
    "c64": 8.0,
    "c128": 16.0,
    "token": 0.0,
}
#: Instructions that launch nothing: they name, group, order or forward buffers, run the
#: computations they call (whose instructions are counted instead), or end an async pair.
NO_KERNEL = frozenset(
    {
        "parameter",
        "constant",
        "get-tuple-element",
        "tuple",
        "bitcast",
        "after-all",
        "opt-barrier",
        "add-dependency",
        "partition-id",
        "replica-id",
        "domain",
        "call",
        "while",
        "conditional",
        "async-start",
        "async-update",
        "async-done",
        "copy-done",
        "send-done",
        "recv-done",
        "all-reduce-done",
        "all-gather-done",
        "collective-permute-done",
    }
)
#: Instructions whose called computations run as the program's own steps.
_DESCEND = frozenset({"call", "while", "conditional", "async-start"})
#: Host memory in an optimized program's layouts (``f32[64]{0:S(5)}``).
HOST_MEMORY_SPACE = "S(5)"
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\](\{[^}]*\})?")
_CALLED = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation|"
    r"branch_computations|called_computations)=(\{[^}]*\}|%?[\w.\-]+)"
)
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_BATCH = re.compile(r"lhs_batch_dims=\{([\d,]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_HIGHEST = re.compile(r"\boperand_precision=\{highest,highest\}")
_BF16_ALGORITHM = re.compile(r"\balgorithm=dot_bf16_bf16_f32(?:_x(\d+))?\b")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_KIND = re.compile(r"\bkind=(k\w+)")


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of an instruction's result type."""

    dtype: str
    dims: tuple[int, ...]
    host: bool  # in host memory (memory space S(5))

    @property
    def nbytes(self) -> float:
        return math.prod(self.dims) * _ITEMSIZE.get(self.dtype, 1.0)


def arrays(type_text: str) -> list[Array]:
    """The arrays of an HLO type (an array type or a tuple of them), in order."""
    found = []
    for dtype, dims, layout in _ARRAY.findall(type_text):
        if dtype not in _ITEMSIZE and not dtype.startswith("f8"):
            continue
        shape = tuple(int(d) for d in dims.split(",") if d)
        found.append(Array(dtype, shape, HOST_MEMORY_SPACE in (layout or "")))
    return found


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    result: str  # the result type's text
    operands: tuple[str, ...]
    attributes: str  # everything after the operand list

    @property
    def arrays(self) -> list[Array]:
        return arrays(self.result)

    @property
    def nbytes(self) -> float:
        return sum(a.nbytes for a in self.arrays)

    def called(self) -> dict[str, tuple[str, ...]]:
        """The computations it calls, by attribute (``calls``, ``body``, ...)."""
        return {
            key: tuple(re.findall(r"[\w.\-]+", group.replace("%", "")))
            for key, group in _CALLED.findall(self.attributes)
        }

    def backend_config(self) -> dict[str, Any]:
        """Its ``backend_config`` when written as JSON (empty otherwise)."""
        start = self.attributes.find("backend_config={")
        if start < 0:
            return {}
        text, depth = self.attributes[start + len("backend_config=") :], 0
        for end, char in enumerate(text):
            depth += {"{": 1, "}": -1}.get(char, 0)
            if depth == 0:
                try:
                    parsed = json.loads(text[: end + 1])
                except json.JSONDecodeError:
                    return {}
                return parsed if isinstance(parsed, dict) else {}
        return {}


def _split_balanced(text: str) -> tuple[str, str]:
    """``text`` that starts with an opening parenthesis, split after its closing one."""
    depth = 0
    for k, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return text[: k + 1], text[k + 1 :]
    return text, ""


def parse_instruction(line: str) -> Instruction | None:
    match = _INSTRUCTION.match(line)
    if match is None:
        return None
    name, rhs = match.group(1), match.group(2).lstrip()
    if rhs.startswith("("):
        result, rest = _split_balanced(rhs)
    else:
        result, _, rest = rhs.partition(" ")
    rest = rest.lstrip()
    opcode, paren, rest = rest.partition("(")
    if not paren:
        return None
    operand_text, attributes = _split_balanced("(" + rest)
    operands = tuple(re.findall(r"%([\w.\-]+)", operand_text))
    return Instruction(name, opcode.strip(), result, operands, attributes)


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instruction]]
    entry: str

    def by_name(self, computation: str) -> dict[str, Instruction]:
        return {i.name: i for i in self.computations.get(computation, [])}


def parse_module(text: str) -> Module:
    """The computations of an HLO module's text, their instructions in order, and the entry."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header and not line.startswith("HloModule"):
                current = header.group(2)
                computations[current] = []
                entry = current if header.group(1) else entry
        elif line.strip() == "}":
            current = None
        else:
            instruction = parse_instruction(line)
            if instruction is not None:
                computations[current].append(instruction)
    return Module(computations, entry)


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def at_full_float32_precision(dot: Instruction) -> bool:
    """Whether a ``dot`` (or a gemm custom call) multiplies float32 at ``HIGHEST`` precision,
    which a GPU runs on its CUDA cores rather than as TF32 on its tensor cores."""
    if not dot.arrays or dot.arrays[0].dtype != "f32":
        return False
    if _HIGHEST.search(dot.attributes):
        return True
    gemm = dot.backend_config().get("gemm_backend_config", {})
    precision = gemm.get("precision_config", {}).get("operand_precision", [])
    return bool(precision) and all(p == "HIGHEST" for p in precision)


def bf16_passes(dot: Instruction) -> int:
    """The bfloat16 products a ``dot`` makes of each pair of blocks of its operands under a
    bfloat16 dot algorithm: 6 at ``dot_bf16_bf16_f32_x6`` (float32 at the six passes of SOAP's
    refreshes on a GPU), 1 at ``dot_bf16_bf16_f32``; 0 without one."""
    algorithm = _BF16_ALGORITHM.search(dot.attributes)
    return 0 if algorithm is None else int(algorithm.group(1) or 1)


#: LAPACK's operation counts of a ``d x d`` matrix (Golub and Van Loan), in units of ``d**3``, by
#: the custom call's target: Cholesky, LU, Householder QR and forming its Q, and a symmetric
#: eigendecomposition with its vectors (tridiagonalization, then back-transformation).
_SOLVER_CUBES = {"potrf": 1 / 3, "getrf": 2 / 3, "geqrf": 4 / 3, "orgqr": 4 / 3, "syevd": 4.0}


def solver_flops(call: Instruction, shapes: dict[str, Instruction]) -> float:
    """A cuSOLVER or cuBLAS solver call's floating-point operations: its matrices' count times
    LAPACK's count for one (a triangular solve: ``d * d`` a right-hand column); 0 for any
    other custom call."""
    target = _TARGET.search(call.attributes)
    name = target.group(1) if target else ""
    operands = [shapes[o].arrays[0] for o in call.operands if o in shapes and shapes[o].arrays]
    if not operands or len(operands[0].dims) < 2:
        return 0.0
    a = operands[0].dims
    matrices, d = math.prod(a[:-2]), a[-1]
    if "triangularSolve" in name and len(operands) > 1:
        b = operands[1].dims
        columns = b[-1] if call.backend_config().get("left_side") else b[-2]
        return float(matrices * d * d * columns)
    cubes = next((c for key, c in _SOLVER_CUBES.items() if key in name), 0.0)
    return matrices * cubes * d**3


def dot_flops(dot: Instruction, shapes: dict[str, Instruction]) -> float:
    """2 x the output's elements x the contracted size, for a ``dot`` (or a gemm custom call
    whose backend config states its dimension numbers)."""
    out = dot.arrays[0] if dot.arrays else None
    lhs = shapes.get(dot.operands[0]) if dot.operands else None
    if out is None or lhs is None or not lhs.arrays:
        return 0.0
    match = _CONTRACTING.search(dot.attributes)
    if match:
        contracting = _dims(match.group(1))
    else:
        numbers = dot.backend_config().get("gemm_backend_config", {}).get("dot_dimension_numbers")
        if not numbers:
            return 0.0
        contracting = tuple(int(d) for d in numbers.get("lhs_contracting_dimensions", []))
    lhs_dims = lhs.arrays[0].dims
    size = math.prod(lhs_dims[d] for d in contracting if d < len(lhs_dims))
    return 2.0 * math.prod(out.dims) * size


@dataclasses.dataclass
class Kernel:
    """One launch of the program: its instruction, where it runs and what it costs."""

    name: str
    opcode: str
    kind: str  # a fusion's kind (``kLoop``, ``kCustom:__triton_gemm``...), a custom call's target
    computation: str
    bytes: float  # read and written
    flops: float  # of its dots and solver calls
    touches_host: bool  # reads or writes host memory in place
    trips: tuple[int | None, ...]  # the trip counts of the loops it sits in (None: unknown)
    # An asynchronous copy between host and device memory (its ``copy-start``): the bytes it
    # moves (0 for any other kernel), which run beside the kernels until its ``copy-done``.
    transfer_bytes: float = 0.0
    # The host copies (their ``copy-start``'s names) whose ``copy-done`` comes in the schedule
    # between the kernel before this one and this one: this kernel starts once they are done.
    awaits: tuple[str, ...] = ()
    # Of ``flops``, those at float32's full precision: dots at HIGHEST
    # (:func:`at_full_float32_precision`) and solver calls (:func:`solver_flops`).
    full_precision_flops: float = 0.0
    # Of ``flops``, those of dots under a bfloat16 dot algorithm, and the FLOPs the bfloat16
    # tensor cores make for them: each dot's times its passes (:func:`bf16_passes`).
    bf16_algorithm_flops: float = 0.0
    bf16_pass_flops: float = 0.0

    @property
    def loop_depth(self) -> int:
        return len(self.trips)


def _fused_traffic(fused: list[Instruction]) -> float:
    """Bytes a fusion reads and writes: each parameter whole unless only sliced (then the
    slices) or only updated in place (then nothing), and its result unless written by an
    in-place update (then the updates)."""
    by_name = {i.name: i for i in fused}
    users: dict[str, list[Instruction]] = {}
    for instruction in fused:
        for operand in instruction.operands:
            users.setdefault(operand, []).append(instruction)

    def through_bitcasts(name: str) -> list[Instruction]:
        # A bitcast moves no bytes: the uses that read are those of what it views.
        found = []
        for use in users.get(name, []):
            found += through_bitcasts(use.name) if use.opcode == "bitcast" else [use]
        return found

    total = 0.0
    for instruction in fused:
        if instruction.opcode != "parameter":
            continue
        uses = through_bitcasts(instruction.name)
        if uses and all(u.opcode in ("slice", "dynamic-slice") for u in uses):
            total += sum(u.nbytes for u in uses)
        elif uses and all(
            u.opcode == "dynamic-update-slice" and u.operands[0] == instruction.name for u in uses
        ):
            continue
        else:
            total += instruction.nbytes
    roots = [fused[-1]] if fused else []
    if roots and roots[0].opcode == "tuple":
        roots = [by_name[o] for o in roots[0].operands if o in by_name]
    for root in roots:
        if root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
            update = by_name.get(root.operands[1])
            total += update.nbytes if update else root.nbytes
        else:
            total += root.nbytes
    return total


def _is_host_transfer(instruction: Instruction, shapes: dict[str, Instruction]) -> bool:
    """Whether ``instruction`` starts an asynchronous copy to or from host memory."""
    if instruction.opcode != "copy-start":
        return False
    source = shapes.get(instruction.operands[0]) if instruction.operands else None
    return any(a.host for a in instruction.arrays) or (
        source is not None and any(a.host for a in source.arrays)
    )


def _kernel(
    instruction: Instruction,
    computation: str,
    module: Module,
    trips: tuple[int | None, ...],
    awaits: tuple[str, ...] = (),
) -> Kernel:
    shapes = module.by_name(computation)
    operands = [shapes[o] for o in instruction.operands if o in shapes]
    touches_host = any(a.host for a in instruction.arrays) or any(
        a.host for o in operands for a in o.arrays
    )
    flops = full_precision_flops = bf16_algorithm_flops = bf16_pass_flops = 0.0
    kind = instruction.opcode
    if instruction.opcode == "fusion":
        match = _KIND.search(instruction.attributes)
        kind = match.group(1) if match else "fusion"
        backend = instruction.backend_config().get("fusion_backend_config", {}).get("kind")
        if kind == "kCustom" and backend:
            kind = f"kCustom:{backend}"
        called = instruction.called().get("calls", ())
        fused = module.computations.get(called[0], []) if called else []
        fused_shapes = {i.name: i for i in fused}
        for dot in (i for i in fused if i.opcode in ("dot", "convolution")):
            counted = dot_flops(dot, fused_shapes)
            flops += counted
            if at_full_float32_precision(dot):
                full_precision_flops += counted
            elif passes := bf16_passes(dot):
                bf16_algorithm_flops += counted
                bf16_pass_flops += passes * counted
        traffic = _fused_traffic(fused)
    else:
        if instruction.opcode == "custom-call":
            target = _TARGET.search(instruction.attributes)
            kind = target.group(1) if target else "custom-call"
        if instruction.opcode in ("dot", "custom-call"):
            flops = dot_flops(instruction, shapes)
            if at_full_float32_precision(instruction):
                full_precision_flops = flops
            elif passes := bf16_passes(instruction):
                bf16_algorithm_flops, bf16_pass_flops = flops, passes * flops
            elif not flops:
                # A solver call (no gemm): it runs on the CUDA cores, at float32.
                flops = full_precision_flops = solver_flops(instruction, shapes)
        traffic = instruction.nbytes + sum(o.nbytes for o in operands)
    transfer = 0.0
    if _is_host_transfer(instruction, shapes):
        # Its result is (destination, source, context): it moves the one array.
        transfer = traffic = max(a.nbytes for a in instruction.arrays)
    return Kernel(
        instruction.name,
        instruction.opcode,
        kind,
        computation,
        traffic,
        flops,
        touches_host and instruction.opcode != "copy-start",
        trips,
        transfer,
        awaits,
        full_precision_flops,
        bf16_algorithm_flops,
        bf16_pass_flops,
    )


@dataclasses.dataclass
class Loop:
    name: str
    trip_count: int | None  # None: unknown to XLA, read by the host at every pass
    kernels: int  # launched by one pass (body and condition)


@dataclasses.dataclass
class Branching:
    name: str
    branches: list[dict[str, Any]]  # per branch: kernels and custom calls by target
    members: list[list[Kernel]]  # per branch: its kernels, those of conditionals in it too
    trips: tuple[int | None, ...]  # the trip counts of the loops it sits in
    # The conditional and the branch (its index) it sits in, or None at the top.
    parent: tuple[str, int] | None = None


@dataclasses.dataclass
class Program:
    """What one compiled program launches (see the module's docstring)."""

    kernels: list[Kernel]
    loops: list[Loop]
    conditionals: list[Branching]
    host_transfers: int  # asynchronous copies to or from host memory
    host_transfer_bytes: float
    num_arguments: int  # the buffers a call hands over

    @property
    def kernel_count(self) -> int:
        return len(self.kernels)

    def fusions_by_kind(self) -> dict[str, int]:
        return dict(sorted(Counter(k.kind for k in self.kernels if k.opcode == "fusion").items()))

    def custom_calls(self) -> dict[str, int]:
        return dict(
            sorted(Counter(k.kind for k in self.kernels if k.opcode == "custom-call").items())
        )

    def opcodes(self) -> dict[str, int]:
        return dict(sorted(Counter(k.opcode for k in self.kernels).items()))

    @property
    def copies(self) -> int:
        return sum(k.opcode == "copy" for k in self.kernels)

    @property
    def host_kernels(self) -> int:
        return sum(k.touches_host for k in self.kernels)

    @property
    def unknown_trip_loops(self) -> int:
        return sum(loop.trip_count is None for loop in self.loops)

    def summary(self) -> dict[str, Any]:
        """The report as plain data (JSON)."""
        return {
            "kernels": self.kernel_count,
            "fusions": self.fusions_by_kind(),
            "custom_calls": self.custom_calls(),
            "opcodes": self.opcodes(),
            "while_loops": [dataclasses.asdict(loop) for loop in self.loops],
            "conditionals": [{"name": c.name, "branches": c.branches} for c in self.conditionals],
            "copies": self.copies,
            "host_transfers": self.host_transfers,
            "host_transfer_bytes": self.host_transfer_bytes,
            "host_kernels": self.host_kernels,
            "kernel_bytes": sum(k.bytes for k in self.kernels),
            "dot_flops": sum(k.flops for k in self.kernels),
        }


def _launches(
    module: Module, computation: str, trips: tuple[int | None, ...], seen: set[str]
) -> tuple[list[Kernel], list[Loop], list[Branching]]:
    """The kernels, loops and conditionals that running ``computation`` reaches."""
    kernels: list[Kernel] = []
    loops: list[Loop] = []
    branchings: list[Branching] = []
    done: list[str] = []  # host copies ended since the last kernel
    for instruction in module.computations.get(computation, []):
        if instruction.opcode == "copy-done" and instruction.operands:
            done.append(instruction.operands[0])
        if instruction.opcode not in NO_KERNEL:
            kernels.append(_kernel(instruction, computation, module, trips, tuple(done)))
            done = []
        if instruction.opcode not in _DESCEND:
            continue
        called = instruction.called()
        trip_count = None
        if instruction.opcode == "while":
            match = _TRIP_COUNT.search(instruction.attributes)
            trip_count = int(match.group(1)) if match else None
        inner = (*trips, trip_count) if instruction.opcode == "while" else trips
        parts = []
        for group in called.values():
            for name in group:
                if name in seen:
                    continue
                seen.add(name)
                parts.append((name, _launches(module, name, inner, seen)))
        for _, (k, lo, br) in parts:
            kernels += k
            loops += lo
            branchings += br
        if instruction.opcode == "while":
            loops.append(
                Loop(instruction.name, trip_count, sum(len(k) for _, (k, *_rest) in parts))
            )
        elif instruction.opcode == "conditional":
            branches, members = [], []
            for index, (_, (k, _loops, nested)) in enumerate(parts):
                targets = Counter(x.kind for x in k if x.opcode == "custom-call")
                branches.append({"kernels": len(k), "custom_calls": dict(sorted(targets.items()))})
                members.append(k)
                for branching in nested:  # those directly in this branch
                    if branching.parent is None:
                        branching.parent = (instruction.name, index)
            branchings.append(Branching(instruction.name, branches, members, trips))
    return kernels, loops, branchings


def read_program(text: str) -> Program:
    """The report of an optimized HLO module's text (``Compiled.as_text()``)."""
    module = parse_module(text)
    kernels, loops, branchings = _launches(module, module.entry, (), {module.entry})
    copies = [k.transfer_bytes for k in kernels if k.transfer_bytes > 0]
    arguments = sum(
        len(i.arrays) for i in module.computations.get(module.entry, []) if i.opcode == "parameter"
    )
    return Program(kernels, loops, branchings, len(copies), sum(copies), arguments)


def kernel_counts(text: str) -> dict[str, Any]:
    """The launches of a program by kind: ``kernels``, ``fusions``, ``custom_calls`` and
    ``opcodes`` (by name), as the ``leaf_cost`` section records them."""
    program = read_program(text)
    opcodes = program.opcodes()
    return {
        "kernels": program.kernel_count,
        "fusions": opcodes.get("fusion", 0),
        "custom_calls": opcodes.get("custom-call", 0),
        "opcodes": opcodes,
    }


_ALIAS = re.compile(r"\{([\d,]*)\}: \((\d+), \{[\d,]*\}")


def aliased_buffers(text: str) -> list[tuple[int, int]]:
    """The (output, argument) pairs of a compiled program whose buffers it shares (a donated
    argument's buffer reused for an output), by flat index, from its module's header."""
    header = text.split("\n", 1)[0]
    start = header.find("input_output_alias={")
    if start < 0:
        return []
    pairs = []
    for output, argument in _ALIAS.findall(header[start:]):
        pairs.append((int(output.split(",")[0] or 0), int(argument)))
    return pairs


def transfer_overlap(text: str) -> list[tuple[int, int]]:
    """For each asynchronous copy between host and device memory in the entry computation, in
    the order XLA scheduled it (an optimized module's instructions are in schedule order): its
    bytes and how many kernels run between its ``copy-start`` and its ``copy-done``, that is,
    the compute it overlaps."""
    module = parse_module(text)
    entry = module.computations.get(module.entry, [])
    shapes = module.by_name(module.entry)
    started: dict[str, tuple[int, int]] = {}
    kernels = 0
    found = []
    for instruction in entry:
        if _is_host_transfer(instruction, shapes):
            size = max((a.nbytes for a in instruction.arrays), default=0)
            started[instruction.name] = (size, kernels)
        elif instruction.opcode == "copy-done" and instruction.operands[0] in started:
            size, at = started.pop(instruction.operands[0])
            found.append((size, kernels - at))
        elif instruction.opcode not in NO_KERNEL:
            kernels += 1
    return found
