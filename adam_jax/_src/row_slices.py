"""A large leaf stepped a slice of rows at a time.

A compressed moment (8-bit codes) is decoded into the compute dtype for the step: a leaf of
38.6M entries (GPT-2's embedding) holds its new moments and its update in float32, 154 MB each,
whatever the codes cost. :func:`in_row_slices` runs a leaf's step in a ``jax.lax.fori_loop``
over slices of its first axis instead: each pass reads a slice of the gradient, the param and
every stored array, steps it, and writes the update and the new stored arrays into the whole
ones in place, so the step's temporaries are one slice's. The values are those of the whole
leaf bit for bit where the step is the same function of each element's own values
(:func:`~adam_jax._src.elementwise.is_elementwise`) and each stored form keeps whole rows apart
(:attr:`adam_jax.MomentStorage.row_slices`). :func:`step_in_slices` turns it on for the
core's rules inside any optimizer, by handing them the leaf schedule :class:`InRowSlices`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adam_jax._src.leaf_schedule import LeafRun, LeafSchedule, LeafStep, WholeLeaves
from adam_jax._src.sequencing import after, copied_in_turn, scales_of
from adam_jax._src.validation import check_integer


def row_unit(rows: int, stored: Any) -> int | None:
    """The fewest rows of a leaf of ``rows`` rows that each stored array cuts as whole entries
    of its own first axis (an 8-bit scale may span several rows), or ``None`` where one does
    not divide them."""
    unit = 1
    for x in jax.tree.leaves(stored):
        if np.ndim(x) == 0 or x.shape[0] == 0 or rows % x.shape[0]:
            return None
        unit = math.lcm(unit, rows // x.shape[0])
    return unit


def in_row_slices(
    step: Callable[[jax.Array, Any, Any], tuple[jax.Array, Any]],
    grad: jax.Array,
    param: Any,
    stored: Any,
    max_elements: int,
    *,
    from_host: bool = False,
) -> tuple[jax.Array, Any] | None:
    """``step(grad, param, stored)`` (the leaf's update and new stored form) run on slices of
    the leaf's rows of at most ``max_elements`` elements, each written in place into the whole
    update and stored form; ``None`` where the stored arrays do not cut the rows evenly
    (:func:`row_unit`) or the leaf is no larger than one slice.

    ``from_host`` says that ``stored`` was brought from host memory and its new form goes back
    there, into the donated buffers (:func:`adam_jax.offload_state`). The loop then updates
    copies of the stored arrays made by arithmetic, one after the other: XLA:GPU follows a loop
    that updates in place an array copied from host memory back to the host array, places the
    loop there and fails to compile the copy back (``copy-start ... doesn't have correct host
    memory space color S(5)``), but does not follow a computation. Made in turn, an array and
    its copy are the only extra one on the device at a time: at most 1.5x the leaf's stored
    form of two moments, in any order XLA picks (``benchmarks/state_residency.py``), and once
    each where XLA makes the copy in place. The values are the same.

    ``step`` must be elementwise in the rows: its result for a slice of rows is that slice of
    its result for the whole leaf. The update is written over a copy of ``grad`` where their
    dtypes agree, or over ``grad`` itself where nothing reads it afterwards (a train step's
    gradient), so that the update costs no buffer of its own there.

    Example:
      >>> import jax.numpy as jnp
      >>> from adam_jax._src.row_slices import in_row_slices
      >>> step = lambda g, p, s: (g * s["scale"], {"scale": s["scale"] + 1})
      >>> grad, stored = jnp.ones((6, 2)), {"scale": jnp.arange(6.0)[:, None]}
      >>> update, new = in_row_slices(step, grad, None, stored, max_elements=4)
      >>> print(update[:, 0], new["scale"][:, 0])
      [0. 1. 2. 3. 4. 5.] [1. 2. 3. 4. 5. 6.]
    """
    rows = grad.shape[0] if grad.ndim else 0
    unit = row_unit(rows, stored) if rows else None
    if unit is None or grad.size <= max_elements:
        return None
    per_row = grad.size // rows
    slice_rows = max(1, max_elements // (per_row * unit)) * unit
    whole, tail = divmod(rows, slice_rows)
    arrays, treedef = jax.tree.flatten(stored)
    ratios = [rows // x.shape[0] for x in arrays]

    def cut(
        start: Any, size: int, gradient: jax.Array, arrays: list[jax.Array]
    ) -> tuple[jax.Array, Any, Any]:
        part = [
            jax.lax.dynamic_slice_in_dim(x, start // r, size // r)
            for x, r in zip(arrays, ratios, strict=True)
        ]
        p = None if param is None else jax.lax.dynamic_slice_in_dim(param, start, size)
        g = jax.lax.dynamic_slice_in_dim(gradient, start, size)
        return g, p, jax.tree.unflatten(treedef, part)

    def write(start: Any, update: jax.Array, new: list[jax.Array], part: Any) -> Any:
        part_update, part_stored = part
        update = jax.lax.dynamic_update_slice_in_dim(update, part_update, start, 0)
        new = [
            jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), start // r, 0)
            for x, y, r in zip(new, jax.tree.leaves(part_stored), ratios, strict=True)
        ]
        return update, new

    update_type = jax.eval_shape(lambda: step(*cut(0, slice_rows, grad, arrays))[0])
    # The update is written over the gradient where their dtypes agree (each slice of the
    # gradient is read before its update is written), so that a gradient that dies here (a
    # train step's) gives its buffer to the update. Made once the stored
    # arrays exist, so that XLA does not allocate every leaf's update up front.
    in_place = update_type.dtype == grad.dtype
    start_from = grad if in_place else jnp.zeros(grad.shape, update_type.dtype)
    update = after(scales_of(stored), start_from)

    def run(update: jax.Array, arrays: list[jax.Array]) -> Any:
        # Each pass reads its slices from the carry it then writes (the slices are apart), so
        # that the loop updates the stored arrays in place instead of beside a copy.
        def one_slice(start: Any, size: int, carry: tuple[jax.Array, list[jax.Array]]) -> Any:
            update, new = carry
            part = step(*cut(start, size, update if in_place else grad, new))
            return write(start, update, new, part)

        carry = jax.lax.fori_loop(
            0,
            whole,
            lambda k, carry: one_slice(k * slice_rows, slice_rows, carry),
            (update, arrays),
        )
        if tail:
            carry = one_slice(whole * slice_rows, tail, carry)
        return carry

    if from_host:
        arrays = copied_in_turn(arrays)
    update, new = run(update, arrays)
    return update, jax.tree.unflatten(treedef, new)


@dataclasses.dataclass(frozen=True)
class InRowSlices(LeafSchedule):
    """The leaf schedule of :func:`step_in_slices`: a leaf of more than ``max_elements``
    entries whose moments are decoded, whose step is elementwise and whose stored arrays cut
    its rows evenly is stepped by :func:`in_row_slices`; then ``inner`` runs the step."""

    max_elements: int
    inner: LeafSchedule = dataclasses.field(default_factory=WholeLeaves)

    def step(self, leaf: LeafStep, carry: Any) -> tuple[jax.Array, list[Any], Any]:
        if (
            leaf.decodes
            and leaf.grad.size > self.max_elements
            and leaf.grad.ndim
            and row_unit(leaf.grad.shape[0], leaf.stored) is not None
            and leaf.row_elementwise()
        ):
            leaf = leaf.with_run(self._in_slices(leaf.run, self.inner.brings_from_host(leaf)))
        return self.inner.step(leaf, carry)

    def brings_from_host(self, leaf: LeafStep) -> bool:
        return self.inner.brings_from_host(leaf)

    def order(self, num_leaves: int) -> tuple[int, ...]:
        return self.inner.order(num_leaves)

    def around(self, schedule: LeafSchedule) -> LeafSchedule:
        return InRowSlices(self.max_elements, self.inner.around(schedule))

    def _in_slices(self, run: LeafRun, from_host: bool) -> LeafRun:
        def sliced(
            stored: list[Any],
            *,
            grad: jax.Array,
            param: Any,
            wait_for: Any,
            two_passes: bool = True,
        ) -> Any:
            del two_passes  # a slice at a time, in one pass each

            def part(g: jax.Array, p: Any, stored: list[Any]) -> tuple[jax.Array, list[Any]]:
                # A slice's step holds no leaf-sized moment to save by two passes.
                return run(list(stored), grad=g, param=p, wait_for=None, two_passes=False)

            # The loop takes every stored array at once: waiting on the float ones is enough.
            waited = after(wait_for, stored, integers=False)
            result = in_row_slices(
                part, grad, param, waited, self.max_elements, from_host=from_host
            )
            assert result is not None  # step() checked the leaf's size and rows
            return result

        return sliced


def step_in_slices(
    inner: optax.GradientTransformation, max_elements: int = 1 << 20
) -> optax.GradientTransformationExtraArgs:
    r"""Steps each large leaf of ``inner`` a slice of its rows at a time, with the same results.

    The rules of the core (every optimizer of the registry built on
    :func:`adam_jax.rules.scale_by_rule`) inside ``inner`` step a leaf of more than
    ``max_elements`` entries in a ``jax.lax.fori_loop`` over slices of its first axis
    (:func:`in_row_slices`) where the leaf's moments are decoded (8-bit codes), every storage
    keeps whole rows apart (:attr:`adam_jax.MomentStorage.row_slices`: float32, bfloat16, 8-bit
    codes; not 4-bit's rank-1 second moment, not block means) and the rule's step is
    elementwise (``is_elementwise``: no per-tensor statistic, no random numbers, no
    transcendental function). Each pass decodes a slice's codes, steps it,
    and writes its new codes and its update in place, so the step holds one slice of float32
    moments, not the whole leaf's, and the update is written over the gradient (a train step's
    gradient, which dies at the update, gives it its buffer). Other leaves and steps are as
    ``inner`` runs them; the params and state are ``inner``'s bit for bit (tested on CPU; on a
    GPU, where XLA contracts a multiply and an add into one FMA within a kernel, kernels cut
    otherwise may round a last bit otherwise: not measured yet):

    .. math::
        (u, s')_{[r_0, r_1)} = \mathrm{step}(g_{[r_0, r_1)}, s_{[r_0, r_1)},
        \theta_{[r_0, r_1)}) \quad \text{for each slice of rows } [r_0, r_1).

    At GPT-2 small's shapes the 8-bit step's temporaries go from four float32 copies of the
    embedding to its update and a few slices (docs/memory.md); with
    :func:`adam_jax.offload_state` outside, the offloaded step is within params + gradients +
    1.5x the largest leaf's state.

    The rules learn the slice size from the leaf schedule :class:`InRowSlices` that
    ``step_in_slices`` hands them as the extra argument ``leaf_schedule`` (optax's combinators
    and the library's pass it on; see :func:`adam_jax.offload_state`). Nested, the innermost
    ``step_in_slices``' size holds.

    The slices are cut along the first axis. A leaf sharded on an Explicit mesh is stepped
    whole. Under automatic sharding the core cannot see a leaf's shards and cuts it anyway,
    with the same values; but the partitioner then moves data between devices in each pass
    where the first axis is sharded, and does not carry the state's shardings through the loop
    (give them: :func:`adam_jax.sharding.state_shardings`). It is meant for params on one
    device, or sharded on an Explicit mesh.

    Args:
      inner: the optimizer, e.g. :func:`adam_jax.adamw_8bit`; any ``GradientTransformation``.
      max_elements: the most entries of a leaf stepped at once, an integer >= 1 (a slice is a
        whole number of rows, and of the rows an 8-bit block spans: at least one of those).

    Returns:
      A ``GradientTransformationExtraArgs`` with ``inner``'s state.

    Raises:
      ValueError: ``max_elements`` is not an integer >= 1.

    Example:
      >>> import jax, jax.numpy as jnp, adam_jax
      >>> params = {"w": jnp.ones((512, 64))}
      >>> tx = adam_jax.step_in_slices(adam_jax.adamw_8bit(1e-3), max_elements=4096)
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> want, _ = adam_jax.adamw_8bit(1e-3).update(params, tx.init(params), params)
      >>> print(bool((updates["w"] == want["w"]).all()))
      True
    """
    if isinstance(max_elements, bool) or not isinstance(max_elements, int):
        raise ValueError(f"max_elements must be an integer >= 1, got {max_elements!r}")
    check_integer("max_elements", max_elements, 1)

    def update_fn(
        updates: optax.Updates,
        state: Any,
        params: optax.Params | None = None,
        *,
        leaf_schedule: LeafSchedule | None = None,
        **extra: Any,
    ) -> tuple[optax.Updates, Any]:
        given = WholeLeaves() if leaf_schedule is None else leaf_schedule
        if isinstance(given, InRowSlices):
            given = given.inner  # the innermost step_in_slices' size wins
        schedule = InRowSlices(max_elements, given)
        return optax.with_extra_args_support(inner).update(
            updates, state, params, leaf_schedule=schedule, **extra
        )

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
