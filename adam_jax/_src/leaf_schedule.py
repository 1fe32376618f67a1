"""How the core steps its leaves: the ``leaf_schedule`` extra argument of a rule's update.

:func:`adam_jax.rules.scale_by_rule` steps the leaves of a tree one after the other, and hands
each leaf's step to a :class:`LeafSchedule`, which decides how it runs: whole and in turn (the
default, :class:`WholeLeaves`), a slice of rows at a time (:func:`adam_jax.step_in_slices`), or
with its state brought from host memory and sent back (:func:`adam_jax.offload_state`). A
wrapper hands its schedule to the transformations inside it through optax's extra arguments,
``update(updates, state, params, leaf_schedule=...)``, which ``optax.chain``,
``optax.inject_hyperparams``, ``optax.masked``, ``optax.partition``, ``optax.apply_if_finite``,
``optax.MultiSteps`` and the library's own wrappers pass on. A transformation that takes no
extra arguments (a plain ``optax.GradientTransformation`` wrapper) steps what it wraps with the
default schedule.

The core calls :meth:`LeafSchedule.step` once a leaf, in the order :meth:`LeafSchedule.order`
gives (the tree's, unless a schedule says otherwise), and threads a carry from one leaf to the
next, so that a schedule can order a leaf after the one before it; all of
this happens while ``jax.jit`` traces the update, and a schedule is a pure function of what it
is given. Wrapping schedules hold the schedule they wrap (``inner``): one that changes how a
leaf's step runs (slices) replaces :attr:`LeafStep.run` and hands the leaf on; one that moves
the state (offload) goes innermost, above the default (:meth:`LeafSchedule.around`), whichever
wrapper is outside the other.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from adam_jax._src.sequencing import scales_of

#: ``run(stored, grad=..., param=..., wait_for=...)``: a leaf's update and new stored moments
#: from its stored moments (one tree per moment), its gradient and param, once the arrays of
#: ``wait_for`` exist.
LeafRun = Callable[..., tuple[jax.Array, list[Any]]]


@dataclasses.dataclass(frozen=True)
class LeafStep:
    """One leaf's step, as the core hands it to a :class:`LeafSchedule`.

    Attributes:
      run: the step (:data:`LeafRun`); a schedule may call it on other arrays than these
        (slices of them, copies in another memory), and then with ``two_passes=False``: on a
        GPU, a whole 8-bit leaf is otherwise read twice
        (:meth:`adam_jax.MomentStorage.in_two_passes`).
      stored: the leaf's stored moments, one tree per moment of the rule.
      grad: the leaf's gradient.
      param: the leaf's param, or ``None`` where the rule does not read it.
      position: the leaf's place among the tree's leaves.
      decoded: for each stored moment, whether its storage keeps it in a form decoded only
        during the step (8-bit or 4-bit codes, factored rows and columns).
      reduces: whether a storage keeps fewer values than the param has (block means,
        factored rows and columns).
      row_elementwise: whether the step computes each element from that element's gradient,
        moments and param alone and every storage keeps whole rows apart, so that a slice of
        rows may be stepped alone with the same values (computed when asked).
    """

    run: LeafRun
    stored: list[Any]
    grad: jax.Array
    param: Any
    position: int
    decoded: tuple[bool, ...]
    reduces: bool
    row_elementwise: Callable[[], bool]

    @property
    def decodes(self) -> bool:
        """Whether a stored moment of the leaf is decoded for the step."""
        return any(self.decoded)

    def with_run(self, run: LeafRun) -> LeafStep:
        """This leaf, stepped by ``run``."""
        return dataclasses.replace(self, run=run)


class LeafSchedule(abc.ABC):
    """How the core runs each leaf's step (see the module docstring)."""

    @abc.abstractmethod
    def step(self, leaf: LeafStep, carry: Any) -> tuple[jax.Array, list[Any], Any]:
        """Runs ``leaf``'s step: ``(update, new stored moments, carry for the next leaf)``;
        ``carry`` is what the previous leaf's step returned, ``None`` for the first leaf."""

    def brings_from_host(self, leaf: LeafStep) -> bool:
        """Whether this schedule brings ``leaf``'s stored moments from host memory (and sends
        their new form back there)."""
        del leaf
        return False

    def order(self, num_leaves: int) -> tuple[int, ...]:
        """The positions of a tree's ``num_leaves`` leaves in the order to step them: the
        tree's own."""
        return tuple(range(num_leaves))

    @abc.abstractmethod
    def around(self, schedule: LeafSchedule) -> LeafSchedule:
        """This schedule with ``schedule`` in place of the default one it ends in."""


class WholeLeaves(LeafSchedule):
    """The default: each leaf stepped whole, and a leaf whose storage decodes its moments only
    once the previous such leaf has stored its own (:mod:`adam_jax._src.sequencing`), so that
    one leaf's decoded moments are alive at a time. The carry is that leaf's new scales."""

    def step(self, leaf: LeafStep, carry: Any) -> tuple[jax.Array, list[Any], Any]:
        update, new = leaf.run(
            leaf.stored, grad=leaf.grad, param=leaf.param, wait_for=carry if leaf.decodes else None
        )
        if leaf.decodes:
            carry = scales_of([t for t, d in zip(new, leaf.decoded, strict=True) if d])
        return update, new, carry

    def around(self, schedule: LeafSchedule) -> LeafSchedule:
        return schedule
