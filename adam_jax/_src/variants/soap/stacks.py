"""SOAP with its state stacked by block shape (``scale_by_soap(..., stack_blocks=True)``): the
blocks of every leaf that share a shape are kept, and stepped, as one stack.

Leaf by leaf, a step makes each leaf's products, moments and refreshes apart: on a GPU at least
one kernel a leaf and a product, however small the leaf (GPT-2 small's step between refreshes
took 7.5 times AdamW's kernels). Here the step gathers the gradient's blocks of one shape from
every leaf into one stack ``(n, *sizes)`` (one copy), the leaves of one shape as one batch
(:class:`StackPlan`), steps each stack as one leaf of ``n`` blocks (:attr:`SoapLayout.stacked`:
one batched product per factor, Adam's moments elementwise in the stack's own layout, one
refresh), and puts each leaf's update back together from its blocks. The state holds a stack's
factors, bases and moments (:class:`StackedSoapState`), so nothing but the gradient and the
update moves between the leaves and the stacks.

Each block's arithmetic is the leaf-by-leaf step's: the same updates, and the same state in
another order (a compressed moment's blocks of codes then hold other values). On the CPU the
stacked step gains little or loses (docs/speed.md): XLA:CPU steps the leaves side by side on
its threads. Normalization (``normalize_grads``, the RMS of each leaf's direction) and weight
decay (each leaf's mask) are applied to the leaves' updates.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adam_jax._src.variants.soap.blocks import _assemble
from adam_jax._src.variants.soap.factors import _TINY
from adam_jax._src.variants.soap.layout import BlockGroup, SoapLayout
from adam_jax._src.variants.soap.mesh import _like, _whole
from adam_jax._src.variants.soap.rule import ScaleBySoapState, SoapRule
from adam_jax.rules import (
    Mask,
    check_non_negative,
    compute_dtype,
    expand_mask,
    real_dtype,
    replicated,
    static_float,
    storages_for,
)


class StackedSoapState(NamedTuple):
    """The state of ``scale_by_soap(..., stack_blocks=True)``: SOAP's state of the stacks
    (:meth:`StackPlan.stack`), one entry per block shape (``"128x128"``) in each of its
    moments, factors and bases; and of the leaves without a factor, one vector of them all
    (Adam's moments, under ``"rest"``; empty without such leaves)."""

    stacks: ScaleBySoapState
    rest: ScaleBySoapState


@dataclasses.dataclass(frozen=True)
class _Kind:
    """The leaves of one working shape, at one of their groups of blocks, in a stack: the
    group's position among each leaf's groups, the group, the leaves (in flattening order) and
    the first block in the stack. They move between the leaves and the stack as one batch."""

    position: int
    group: BlockGroup
    leaves: tuple[int, ...]
    start: int

    @property
    def n(self) -> int:
        """The blocks of all the kind's leaves."""
        return len(self.leaves) * self.group.n


def _made_first_on_a_tpu(x: jax.Array) -> jax.Array:
    """``x``, a kind's leaves stacked, made before it is cut into blocks on a TPU (behind an
    ``optimization_barrier``; elsewhere as it is). Without the barrier XLA:TPU fuses the stack
    into the moves of its blocks and moves each leaf's blocks apart, in float32 and again in
    bfloat16: at GPT-2 small with blocks of 128, 96 copies a step."""
    return jax.lax.platform_dependent(x, tpu=jax.lax.optimization_barrier, default=lambda y: y)


def _merged_together(group: BlockGroup, blocks: jax.Array) -> jax.Array:
    """:meth:`BlockGroup.merge` of a kind's leaves at once, ``blocks`` ``(m, group.n, *sizes)``.
    Where the last dimension is cut into 2 to 7 blocks (fewer than a TPU tile's 8 rows), the
    concatenation of its columns of blocks: XLA:TPU lays the merge of such leaves out
    transposed, then copies each leaf back, and its param to the transposed layout for the
    step's last kernel (at GPT-2 small with blocks of 128: the twelve ``3072 x 768`` matrices,
    the position table and the embedding)."""
    count = group.counts[-1]
    if not 1 < count < 8:
        return jax.vmap(group.merge)(blocks)
    column = dataclasses.replace(
        group, spans=(*group.spans[:-1], (0, group.sizes[-1])), counts=(*group.counts[:-1], 1)
    )
    x = blocks.reshape(len(blocks), *group.counts, *group.sizes)
    columns = [
        jax.vmap(column.merge)(
            jax.lax.index_in_dim(x, j, axis=len(group.counts), keepdims=False).reshape(
                len(blocks), column.n, *group.sizes
            )
        )
        for j in range(count)
    ]
    return jnp.concatenate(columns, axis=-1)


def _merged(group: BlockGroup, blocks: jax.Array, m: int) -> tuple[jax.Array, ...]:
    """:meth:`BlockGroup.merge` of each of a kind's ``m`` leaves from their ``blocks``, leaf
    after leaf: on a TPU all at once (:func:`_merged_together`: leaf by leaf, XLA:TPU copies the
    leaves' blocks apart), elsewhere leaf by leaf, which XLA:GPU fuses into each leaf's last
    kernel, reading that leaf's blocks alone."""
    n = group.n

    def together(b: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(_merged_together(group, b.reshape(m, n, *group.sizes)))

    def apart(b: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(group.merge(b[j * n : (j + 1) * n]) for j in range(m))

    return jax.lax.platform_dependent(blocks, tpu=together, default=apart)


@dataclasses.dataclass(frozen=True)
class StackPlan:
    """Where each leaf's blocks sit in the stacks, from the leaves' shapes and the layout:
    every leaf with a factor is cut into its groups of blocks (:meth:`SoapLayout.groups`), and
    the groups of one block shape make a stack, kind after kind (:class:`_Kind`: the leaves of
    one working shape at one group position, in order of their first leaf), and within a kind
    leaf after leaf in flattening order; the leaves without a factor make one vector, in
    order."""

    shapes: tuple[tuple[int, ...], ...]
    working: tuple[tuple[int, ...], ...]
    groups: tuple[tuple[BlockGroup, ...], ...]
    stacks: tuple[tuple[str, tuple[_Kind, ...]], ...]
    rest: tuple[int, ...]

    @classmethod
    def of(cls, leaves: list[Any], layout: SoapLayout) -> StackPlan:
        shapes = tuple(tuple(jnp.shape(leaf)) for leaf in leaves)
        working = tuple(layout.shape(shape) for shape in shapes)
        # Per stack, per (working shape, group position): the group and its leaves.
        kinds: dict[str, dict[Any, tuple[BlockGroup, list[int]]]] = collections.defaultdict(dict)
        groups: list[tuple[BlockGroup, ...]] = []
        rest: list[int] = []
        for i, shape in enumerate(shapes):
            if all(f is None for f in layout.factors(shape)):
                groups.append(())
                rest.append(i)
                continue
            groups.append(layout.groups(shape))
            for position, group in enumerate(groups[-1]):
                name = "x".join(str(s) for s in group.sizes)
                kinds[name].setdefault((working[i], position), (group, []))[1].append(i)
        stacks = []
        for name, of_stack in kinds.items():
            placed, start = [], 0
            for (_, position), (group, members) in of_stack.items():
                placed.append(_Kind(position, group, tuple(members), start))
                start += placed[-1].n
            stacks.append((name, tuple(placed)))
        return cls(shapes, working, tuple(groups), tuple(stacks), tuple(rest))

    def stack_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each stack's shape, ``(n, *sizes)``, by name."""
        return {
            name: (sum(kind.n for kind in kinds), *kinds[0].group.sizes)
            for name, kinds in self.stacks
        }

    def stack(self, leaves: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The stacks of ``leaves`` (laid out as the plan's), each the concatenation of its
        kinds' blocks, ``(n, *sizes)``; and the leaves without a factor, flattened and
        concatenated, under ``"rest"``."""
        stacks = {
            name: jnp.concatenate([self._blocks(leaves, kind) for kind in kinds])
            for name, kinds in self.stacks
        }
        if not self.rest:
            return stacks, {}
        flat = [_whole(replicated(leaves[i])).reshape(-1) for i in self.rest]
        return stacks, {"rest": jnp.concatenate(flat)}

    def _blocks(self, leaves: list[Any], kind: _Kind) -> jax.Array:
        """The blocks of ``kind``'s leaves, leaf after leaf, as ``(n, *sizes)``."""
        whole = jnp.stack(
            [_whole(replicated(leaves[i])).reshape(self.working[i]) for i in kind.leaves]
        )
        if kind.group.n > 1:  # a leaf of one block is not cut
            whole = _made_first_on_a_tpu(whole)
        blocks = jax.vmap(kind.group.split)(whole)
        return blocks.reshape(kind.n, *kind.group.sizes)

    def unstack(self, stacks: dict[str, Any], rest: dict[str, Any], like: list[Any]) -> list[Any]:
        """The inverse of :meth:`stack`: each leaf from its blocks, in the dtype and typed
        sharding of ``like``'s."""
        parts: dict[int, list[Any]] = {i: [None] * len(g) for i, g in enumerate(self.groups)}
        for name, kinds in self.stacks:
            for kind in kinds:
                blocks = stacks[name][kind.start : kind.start + kind.n]
                merged = _merged(kind.group, blocks, len(kind.leaves))
                for j, i in enumerate(kind.leaves):
                    parts[i][kind.position] = merged[j]
        sizes = [math.prod(self.shapes[i]) for i in self.rest]
        edges = itertools.accumulate(sizes, initial=0)
        for i, start, size in zip(self.rest, edges, sizes, strict=False):
            parts[i] = [rest["rest"][start : start + size].reshape(self.shapes[i])]
        leaves = []
        for i, shape in enumerate(self.shapes):
            if self.groups[i]:
                leaf = _assemble(self.groups[i], parts[i]).reshape(shape)
            else:
                leaf = parts[i][0]
            leaves.append(_like(leaf, like[i]).astype(jnp.result_type(like[i])))
        return leaves


def _check_storages(rule: SoapRule, params: Any) -> None:
    """Refuses moment storages that depend on the leaf: different ones for different leaves
    (``per_leaf``), or kept per tensor (its rows and columns) or reduced, which a stack's shape
    would change."""
    for moment in rule.moments()[:2]:
        storages = storages_for(moment.storage, params)
        if any(storage != storages[0] for storage in storages):
            raise ValueError(
                f"stack_blocks=True keeps {moment.name} in stacks of blocks from several "
                f"leaves: {moment.name}_dtype's per_leaf storages, which differ between "
                "leaves, cannot apply; pass one storage, or stack_blocks=False"
            )
        if storages and (storages[0].reduces or storages[0].per_tensor):
            raise ValueError(
                f"stack_blocks=True keeps {moment.name} in stacks of blocks, not in each "
                f"leaf's shape: {moment.name}_dtype={storages[0]!r} keeps statistics of a "
                "tensor's rows or columns; pass an elementwise storage (a dtype, "
                "BlockwiseQuantized) or stack_blocks=False"
            )


def scale_by_soap_stacks(
    rule: SoapRule,
    inner: Any,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SOAP of ``rule`` stepped on the stacks of its blocks (see the module): ``inner`` makes
    SOAP's transformation (without weight decay) of a rule, that of the stacks (a
    :attr:`SoapLayout.stacked` rule) and that of the leaves without a factor. Both leave the
    normalization, with it the bias correction (a factor of the normalized direction), and
    weight decay to this transformation, which applies them to each leaf's update."""
    scheduled = callable(weight_decay)
    if not scheduled:
        check_non_negative("weight_decay", weight_decay)
    no_decay = not scheduled and static_float(weight_decay) == 0.0
    normalized = bool(rule.normalize_grads)
    stacked_rule = dataclasses.replace(
        rule,
        stacked=True,
        normalize_grads=False,
        correct_bias=rule.correct_bias and not normalized,
    )
    # The leaves without a factor as one vector, which keeps none with precondition_1d off.
    rest_rule = dataclasses.replace(stacked_rule, stacked=False, precondition_1d=False)
    stacked_soap, rest_soap = inner(stacked_rule), inner(rest_rule)

    def init_fn(params: optax.Params) -> StackedSoapState:
        SoapRule.check_params(params)
        _check_storages(rule, params)
        leaves = jax.tree.leaves(params)
        stacks, rest = StackPlan.of(leaves, rule.layout).stack(leaves)
        return StackedSoapState(stacked_soap.init(stacks), rest_soap.init(rest))

    def finished(
        u: jax.Array, param: Any, rate: Any, count: jax.Array, corrections: dict[Any, Any]
    ) -> jax.Array:
        """A leaf's update as the leaf-by-leaf step ends it: normalized and bias-corrected
        (``corrections``: the step size's factor by compute dtype, made once a step), then
        decayed (none at the first step, which only initializes)."""
        if normalized:
            u = u / (_TINY + jnp.sqrt(jnp.mean(jnp.square(u))))
            if rule.correct_bias:
                dtype = real_dtype(compute_dtype(u.dtype))
                if dtype not in corrections:
                    d = rule.scalars({"count": count}, dtype).adam
                    corrections[dtype] = jnp.sqrt(d.c2) / d.c1
                u = u * corrections[dtype]
        if rate is None:
            return u
        decayed = u + rate * jnp.asarray(param).astype(u.dtype)
        return jnp.where(count == 0, jnp.zeros_like(u), decayed)

    def update_fn(
        updates: optax.Updates,
        state: StackedSoapState,
        params: optax.Params | None = None,
        **extra: Any,
    ) -> tuple[optax.Updates, StackedSoapState]:
        leaves = jax.tree.leaves(updates)
        treedef: Any = jax.tree.structure(updates)  # its methods are untyped in jax's stubs
        plan = StackPlan.of(leaves, rule.layout)
        stacks, rest = plan.stack(leaves)
        stacks, stacks_state = stacked_soap.update(stacks, state.stacks, None, **extra)
        rest, rest_state = rest_soap.update(rest, state.rest, None, **extra)
        count = state.stacks.count
        rates: list[Any] = [None] * len(leaves)
        param_leaves: list[Any] = [None] * len(leaves)
        if not no_decay:
            if params is None:
                raise ValueError("weight decay needs params: call update(updates, state, params)")
            param_leaves = treedef.flatten_up_to(params)
            rate = weight_decay(count) if scheduled else weight_decay
            keep = [True] * len(leaves) if mask is None else expand_mask(mask, params)
            rates = [rate if k else None for k in keep]
        steps = zip(plan.unstack(stacks, rest, leaves), param_leaves, rates, strict=True)
        corrections: dict[Any, Any] = {}
        new = [finished(u, p, r, count, corrections) for u, p, r in steps]
        return treedef.unflatten(new), StackedSoapState(stacks_state, rest_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
