"""A GPU time model of a compiled step, for choosing between designs when no GPU is lent.

A prediction, never a measurement: the docs say which figures are which. From the optimized
program (:mod:`benchmarks.hlo_program`) and the card's datasheet:

.. math::
    t = t_{\\mathrm{host}}(n) + \\sum_{k \\in \\mathrm{kernels}}
        \\max\\Big(\\frac{\\mathrm{bytes}_k}{\\eta B}, \\frac{\\mathrm{flops}_k}{\\eta_f F},
        t_{\\mathrm{launch}}\\Big)
      + n_{\\mathrm{solver}} t_{\\mathrm{solver}}
      + (n_{\\mathrm{cond}} + n_{\\mathrm{loop}} p) t_{\\mathrm{sync}}

* :math:`t_{\\mathrm{host}}(n) = a + b n + c n^2`: the host's handling of a call of ``n``
  argument buffers before the device starts (the ``leaf_cost`` section's no-ops measure it:
  on an H100, 0.095 ms for 4 buffers, 1.55 ms for 400, 33.7 ms for 4,000);
* each kernel at least a launch's time, else its bytes at a fraction :math:`\\eta` of the HBM
  bandwidth :math:`B` or its dot FLOPs at a fraction of the peak :math:`F`: the TF32 tensor
  cores' for float32 dots at JAX's default precision, the CUDA cores' FP32 peak (7.4 times
  lower on an H100) for those at ``HIGHEST``, the bfloat16 tensor cores' for each pass of a
  bfloat16 dot algorithm (SOAP's refreshes: six passes); a kernel that reads or writes host
  memory in place at the PCIe bandwidth instead;
* each cuSOLVER/cuBLAS solver call a fixed cost, or its LAPACK operation count at the same
  fraction of the FP32 peak where that is more (a large matrix's), and each conditional and
  each pass of a while loop whose trip count XLA does not know a host synchronization (``p``
  passes assumed);
* an asynchronous copy between host and device memory (``copy-start`` to ``copy-done``) runs
  on a copy stream of its own, one copy after another at a fraction :math:`\\eta` of the PCIe
  bandwidth, beside the kernels: it starts once issued and the copy before it is done, and the
  first kernel after its ``copy-done`` waits for it (so the sum above becomes a timeline of two
  streams; the program ends when both have). XLA:GPU puts every such copy on one queue, so
  the two directions do not overlap each other (an H200 moved a step's state both ways at
  45 GB/s, one direction's share of its PCIe link);
* a conditional's branches are costed apart: :func:`predict` takes the branch to count
  (``"cheapest"``, the step between refreshes; ``"dearest"``; or weights).

:data:`CALIBRATED` holds the constants fitted (:func:`fit`) to the rows recorded on an H100
and an H200 in ``benchmarks/results/``; ``python -m benchmarks.calibration`` prints the table
of predicted against measured for every row, with its error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.hlo_program import Program

#: Solver and triangular-solve library calls, costed apart from gemms.
SOLVER_MARKERS = ("cusolver", "syevd", "potrf", "getrf", "geqrf", "orgqr", "triangularSolve")


@dataclasses.dataclass(frozen=True)
class Card:
    """A GPU's datasheet facts."""

    name: str
    hbm_bytes_per_s: float
    pcie_bytes_per_s: float
    dense_tf32_flops: float  # float32 dots at JAX's default precision run on TF32 tensor cores
    fp32_flops: float  # float32 dots at HIGHEST precision run on the CUDA cores
    dense_bf16_flops: float  # each pass of a bfloat16 dot algorithm, on the tensor cores


CARDS: dict[str, Card] = {
    # H100 SXM5 80GB: 3.35 TB/s HBM3, PCIe Gen5 x16, 494.7 TFLOPS TF32 dense, 66.9 FP32,
    # 989.4 BF16 dense.
    "h100": Card("NVIDIA H100 SXM 80GB", 3.35e12, 64e9, 494.7e12, 66.9e12, 989.4e12),
    # H200 141GB: 4.8 TB/s HBM3e, the H100's compute.
    "h200": Card("NVIDIA H200 141GB", 4.8e12, 64e9, 494.7e12, 66.9e12, 989.4e12),
}


@dataclasses.dataclass(frozen=True)
class Constants:
    """The model's fitted constants (seconds, or fractions of a peak)."""

    host_fixed: float
    host_per_argument: float
    host_per_argument_squared: float
    launch: float
    bandwidth_fraction: float
    flops_fraction: float
    solver_call: float
    sync: float
    unknown_loop_passes: int = 4


#: Fitted by ``python -m benchmarks.calibration --fit`` (coordinate descent over a grid, least
#: squared log error) to the 96 rows recorded on an H100 and an H200 that it can build again;
#: the solver and sync constants rest on SOAP's three cycles alone, and a solver call's cost
#: does not grow with its matrix here (SOAP at d = 256 is under-predicted 2.5x).
CALIBRATED = Constants(
    host_fixed=100e-6,
    host_per_argument=3e-6,
    host_per_argument_squared=1e-9,
    launch=2e-6,
    bandwidth_fraction=0.7,
    flops_fraction=0.5,
    solver_call=20e-6,
    sync=10e-6,
)


def host_seconds(num_arguments: int, constants: Constants = CALIBRATED) -> float:
    n = num_arguments
    return (
        constants.host_fixed
        + constants.host_per_argument * n
        + constants.host_per_argument_squared * n * n
    )


def _passes(trips: tuple[int | None, ...], constants: Constants) -> int:
    """How often something inside loops of these trip counts runs (an unknown count: the
    assumed passes)."""
    return math.prod(constants.unknown_loop_passes if t is None else t for t in trips)


def _kernel_seconds(kernel: Any, card: Card, constants: Constants) -> float:
    """One kernel's seconds, times the passes of the loops it sits in (a host copy's: the
    copy's own, on its stream)."""
    if any(marker in kernel.kind for marker in SOLVER_MARKERS):
        once = max(
            constants.solver_call,
            kernel.full_precision_flops / (constants.flops_fraction * card.fp32_flops),
        )
    else:
        on_bus = kernel.touches_host or kernel.transfer_bytes > 0
        bandwidth = card.pcie_bytes_per_s if on_bus else card.hbm_bytes_per_s
        once = max(
            kernel.bytes / (constants.bandwidth_fraction * bandwidth),
            (
                (kernel.flops - kernel.full_precision_flops - kernel.bf16_algorithm_flops)
                / card.dense_tf32_flops
                + kernel.full_precision_flops / card.fp32_flops
                + kernel.bf16_pass_flops / card.dense_bf16_flops
            )
            / constants.flops_fraction,
            constants.launch,
        )
    return once * _passes(kernel.trips, constants)


def _branch_weights(count: int, branch: str | Sequence[float], costs: list[float]) -> list[float]:
    if isinstance(branch, str):
        if branch not in ("cheapest", "dearest"):
            raise ValueError(f"branch must be 'cheapest', 'dearest' or weights, got {branch!r}")
        pick = min if branch == "cheapest" else max
        chosen = costs.index(pick(costs))
        return [float(i == chosen) for i in range(count)]
    weights = list(branch)
    if len(weights) != count or not math.isclose(sum(weights), 1.0):
        raise ValueError(f"branch weights must be {count} numbers that sum to 1, got {weights}")
    return weights


def _conditionals_seconds(
    program: Program,
    cost: Callable[[Any], float],
    constants: Constants,
    branch: str | Sequence[float],
) -> float:
    """The conditionals' seconds: each outermost one's branches weighted by ``branch``, a
    branch costing its own kernels and the conditionals nested in it (weighted alike where
    ``branch`` is a word, by their cheapest branch where it is weights: those are the outermost
    conditionals')."""
    conditionals = program.conditionals
    inside = [{id(k) for member in c.members for k in member} for c in conditionals]
    nested_branch = branch if isinstance(branch, str) else "cheapest"

    def seconds(i: int, which: str | Sequence[float]) -> float:
        costs, name = [], conditionals[i].name
        for b, member in enumerate(conditionals[i].members):
            nested = [j for j, c in enumerate(conditionals) if c.parent == (name, b)]
            theirs = set().union(*(inside[j] for j in nested))
            own = sum(cost(k) for k in member if id(k) not in theirs)
            costs.append(own + sum(seconds(j, nested_branch) for j in nested))
        weights = _branch_weights(len(costs), which if any(costs) else "cheapest", costs)
        chosen = sum(w * c for w, c in zip(weights, costs, strict=True))
        # The branch's index goes to the host at every pass of the loops around it.
        return chosen + _passes(conditionals[i].trips, constants) * constants.sync

    return sum(seconds(i, branch) for i, c in enumerate(conditionals) if c.parent is None)


def predict(
    program: Program,
    card: str,
    constants: Constants = CALIBRATED,
    branch: str | Sequence[float] = "cheapest",
) -> float:
    """Seconds of one call of ``program`` on ``card`` ("h100" or "h200"), by the model above."""
    spec = CARDS[card]

    def cost(kernel: Any) -> float:
        return _kernel_seconds(kernel, spec, constants)

    in_branch = {id(k) for c in program.conditionals for member in c.members for k in member}
    # The kernels' stream and the host copies' (outside loops and branches), in schedule order.
    device, copies_free = 0.0, 0.0
    copy_ends: dict[str, float] = {}
    for kernel in program.kernels:
        if id(kernel) in in_branch:
            continue
        device = max([device, *(copy_ends.get(name, 0.0) for name in kernel.awaits)])
        if kernel.transfer_bytes > 0 and not kernel.trips:
            copies_free = max(device, copies_free) + cost(kernel)
            copy_ends[kernel.name] = copies_free
        else:
            device += cost(kernel)
    device = max(device, copies_free) + _conditionals_seconds(program, cost, constants, branch)
    device += sum(
        constants.unknown_loop_passes * constants.sync
        for loop in program.loops
        if loop.trip_count is None
    )
    return host_seconds(program.num_arguments, constants) + device


def fit(
    rows: Sequence[tuple[Program, str, float, str | Sequence[float]]],
    grid: dict[str, Sequence[float]],
    sweeps: int = 3,
) -> Constants:
    """The constants, each one of its values in ``grid`` (the others from :data:`CALIBRATED`),
    whose predictions of ``rows`` (program, card, measured seconds, branch) have the least mean
    squared log error, by coordinate descent: ``sweeps`` times, each constant in turn set to
    its best value with the others held."""

    def error(constants: Constants) -> float:
        return sum(
            math.log(predict(p, card, constants, branch) / measured) ** 2
            for p, card, measured, branch in rows
        ) / len(rows)

    best = CALIBRATED
    best_error = error(best)
    for _ in range(sweeps):
        for name, values in grid.items():
            for value in values:
                candidate = dataclasses.replace(best, **{name: value})
                candidate_error = error(candidate)
                if candidate_error < best_error:
                    best, best_error = candidate, candidate_error
    return best
