"""SOAP's moment rule (:class:`SoapRule`): its state (:class:`ScaleBySoapState`), its per-step
scalars (:class:`SoapScalars`) and phases (:data:`PHASES`), the checks of its hyperparameters,
and its step of a leaf: the factors' averages, Adam in their eigenbasis and the refresh of the
bases, for a whole leaf or for its blocks."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adam_jax import rules
from adam_jax._src.orthonormalization import at_full_precision
from adam_jax._src.variants.soap.blocks import _LeafBlocks
from adam_jax._src.variants.soap.factors import (
    _TINY,
    FactorStorage,
    _eigenbasis,
    _factor_storage,
    _outer,
    _outer_blocks,
    _pack,
    _pack_groups,
    _rectify,
    _refresh_blocks,
    _rotate,
    _rotate_blocks,
    average_factors,
    bjorck_iterations,
    dimension_key,
)
from adam_jax._src.variants.soap.layout import BlockGroup, SoapLayout
from adam_jax._src.variants.soap.mesh import _like, _whole
from adam_jax._src.variants.soap.solves import DIRECT, Solves
from adam_jax.quantization import FourBitRank1
from adam_jax.rules import (
    ORTHOGONALIZATIONS,
    CastStorage,
    FlatParams,
    Leaf,
    Moment,
    MomentRule,
    MomentStorage,
    StepScalars,
    branch,
    moving_average,
    replicated,
    second_moment,
    step_scalars,
)

# The authors' max_precond_dim, which the rule's None stands for (optax.inject_hyperparams
# would inject a number as an array, and it fixes the factors' shapes).
_MAX_PRECOND_DIM = 10000


class ScaleBySoapState(NamedTuple):
    """The state of :func:`scale_by_soap`.

    Attributes:
      count: the steps taken (the first only initializes the factors and the bases).
      mu: the first moment, in the rotated basis (as the authors keep ``exp_avg``).
      nu: the second moment of the rotated gradient.
      gg: per leaf, the Kronecker factors (Shampoo's :math:`L`, :math:`R`), flattened and
        concatenated in dimension order (empty for a leaf with none); with ``block_size``,
        block after block in the order of :class:`SoapLayout` (the groups of blocks of one
        shape, full blocks first; row-major within a group), each block's factors in
        dimension order.
      q: per leaf, their eigenbases, stored alike.
    """

    count: jax.Array  # type: ignore[assignment]  # (optax states name it so too)
    mu: optax.Updates
    nu: optax.Updates
    gg: optax.Updates
    q: optax.Updates


def _check_factor_dtype(name: str, value: Any) -> None:
    """None, a floating dtype, or a storage that keeps every value of a signed vector."""
    accepted = (
        "None, a floating dtype (e.g. jnp.bfloat16) or a MomentStorage that keeps every "
        "value of a signed vector (quantization.BlockwiseQuantized(signed=True), "
        "quantization.FourBitBlockwise)"
    )
    if value is None:
        return
    if isinstance(value, MomentStorage):
        why = None
        if value.reduces or value.per_tensor:
            why = "it reduces or depends on the param's shape"
        elif getattr(value, "signed", True) is False or isinstance(value, FourBitRank1):
            why = "it keeps non-negative values only"
        elif (
            isinstance(value, CastStorage)
            and value.dtype is not None
            and not jnp.issubdtype(value.dtype, jnp.floating)
        ):
            why = f"its dtype {jnp.dtype(value.dtype).name} is not floating"
        if why is not None:
            raise ValueError(f"{name} must be {accepted}; {type(value).__name__}: {why}")
        return
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise ValueError(f"{name} must be {accepted}, got {value!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be {accepted}, got the dtype {dtype.name}")


class SoapScalars(NamedTuple):
    """Per-step scalars of SOAP: the step count, Adam's weights and corrections at
    :math:`t` = ``count``, the factors' weight :math:`1-\\beta_s`, whether this step is the
    first (which only initializes) and whether the bases are refreshed after it (Python
    bools where the tree's phase is chosen before the leaves step)."""

    count: jax.Array  # type: ignore[assignment]  # (optax states name it so too)
    adam: StepScalars
    wg: Any
    first: jax.Array | bool
    refresh: jax.Array | bool


#: The phases of a SOAP step, which :func:`scale_by_soap` chooses for the whole tree: the first
#: step (which only initializes the bases), a step, a step after which every basis is refreshed.
PHASES = ("first", "step", "refresh")
#: How the first step builds the bases (``first_basis``).
FIRST_BASES = ("eigh", "power")


def _check_shampoo_beta(name: str, value: Any) -> None:
    number = rules.static_float(value)
    if number is not None and not (number < 1.0 and math.isfinite(number)):
        raise ValueError(f"{name} must be in [0, 1), or negative for b2, got {value!r}")


def _check_axis_name(name: str, value: Any) -> None:
    names = value if isinstance(value, tuple) else (value,)
    if value is not None and not (
        names and all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names)
    ):
        raise ValueError(
            f"{name} must be None, the name of a mesh axis or a tuple of distinct names, "
            f"got {value!r}"
        )


def _static_count(minimum: int) -> Any:
    """The check of a field that fixes the compiled step (shapes, or a number of products):
    None, or a Python integer >= ``minimum`` (no array, no float)."""

    def check(name: str, value: Any) -> None:
        if value is None or (
            isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        ):
            return
        hint = (
            f" (it fixes the compiled step: give optax.inject_hyperparams static_args=('{name}',))"
            if hasattr(value, "shape")
            else ""
        )
        raise ValueError(f"{name} must be None or an integer >= {minimum}{hint}, got {value!r}")

    return check


@dataclasses.dataclass(frozen=True, kw_only=True)
class SoapRule(MomentRule):
    """SOAP's moment rule: see :func:`scale_by_soap`."""

    b1: Any = rules.b1(0.95)
    b2: Any = rules.b2(0.95)
    shampoo_beta: Any = rules.hyperparam(
        -1.0,
        r"decay :math:`\beta_s` of the Kronecker factors, in [0, 1); negative (the authors' "
        "-1) uses ``b2``.",
        _check_shampoo_beta,
    )
    eps: Any = rules.eps()
    precondition_frequency: Any = rules.hyperparam(
        10, "steps between refreshes of the eigenbases, an integer >= 1.", rules.integer(1)
    )
    stagger_refresh: bool = rules.hyperparam(
        False,
        "refresh each block (each leaf, without ``block_size``) at its own offset within "
        "the ``precondition_frequency`` window, so that every step carries about "
        "``1/precondition_frequency`` of the refresh work; ``False`` (the authors' "
        "schedule, and this library's before the option): every basis at the same step.",
    )
    max_precond_dim: int | None = rules.hyperparam(
        None,
        "dimensions larger than this get no factor (the identity), an integer >= 1; ``None`` "
        "is the authors' 10000. ``None`` rather than a number because "
        "``optax.inject_hyperparams`` would inject a number as an array, and this fixes "
        'shapes: pass ``static_args=("max_precond_dim",)`` to set it there.',
        _static_count(1),
    )
    block_size: int | None = rules.hyperparam(
        None,
        "cut each preconditioned dimension of a leaf's working shape into blocks of at most "
        "this many values (the last one smaller where it does not divide), each block of the "
        "tensor preconditioned as its own SOAP, so that no ``eigh`` or QR is larger; an "
        "integer >= 1, or ``None``: no blocks. It fixes shapes: pass "
        '``static_args=("block_size",)`` to ``optax.inject_hyperparams``.',
        _static_count(1),
    )
    block_axis: str | tuple[str, ...] | None = rules.hyperparam(
        None,
        "the name of a mesh axis (of the mesh set by ``jax.set_mesh`` around ``init`` and "
        "``update``), or a tuple of names (their devices in row-major order), to spread each "
        "leaf's blocks over: a device keeps, accumulates, rotates by and refreshes the factors "
        "and bases of its own blocks only (``ceil(n / devices)`` of a leaf's ``n``); ``None``: "
        "every device all of them. Needs ``block_size``. With ``stagger_refresh``, each device "
        "refreshes its own blocks at their offsets.",
        _check_axis_name,
    )
    merge_dims: bool = rules.hyperparam(
        False,
        "merge consecutive dimensions of tensors of two or more dimensions while their product "
        "stays at most ``max_precond_dim`` (the authors' ``merge_dims``).",
    )
    precondition_1d: bool = rules.hyperparam(False, "give 1-D leaves a factor too.")
    normalize_grads: bool = rules.hyperparam(
        False, r"divide each leaf's direction by :math:`10^{-30}` plus its RMS."
    )
    correct_bias: bool = rules.hyperparam(
        True, r"Adam's bias correction, in the step size: :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`."
    )
    mu_dtype: Any = rules.mu_dtype()
    nu_dtype: Any = rules.nu_dtype()
    factor_dtype: Any = rules.hyperparam(
        None,
        "storage of the Kronecker factors ``gg``: ``None`` (the compute dtype, at least "
        "float32), a floating dtype such as ``jnp.bfloat16``, or a "
        ":class:`adam_jax.MomentStorage` that keeps every value of a signed vector; loaded "
        "back in the compute dtype for the step. A dtype is callable, which "
        "``optax.inject_hyperparams`` would take for a schedule: pass "
        '``static_args=("factor_dtype", "basis_dtype")`` there.',
        _check_factor_dtype,
    )
    basis_dtype: Any = rules.hyperparam(
        None,
        "storage of the eigenbases ``q``, as ``factor_dtype`` (e.g. ``jnp.bfloat16``, "
        "``quantization.BlockwiseQuantized()`` for 8 bits, ``quantization.FourBitBlockwise()`` "
        "for 4); a stored basis is decoded and rectified (Björck orthonormalization) before "
        "use.",
        _check_factor_dtype,
    )
    basis_rectification: int | None = rules.hyperparam(
        None,
        "Björck iterations that rectify each basis before use, an integer >= 0; ``None``: "
        ":func:`bjorck_iterations` of ``basis_dtype`` (none for float bases, two for bfloat16 "
        "and 8-bit ones, three for 4-bit). Each iteration costs as many products as the "
        "step's rotations of the gradient; ``0`` rotates by the decoded basis as it is. It "
        'fixes the compiled step: pass ``static_args=("basis_rectification",)`` to '
        "``optax.inject_hyperparams``.",
        _static_count(0),
    )
    orthogonalization: str = rules.hyperparam(
        "auto",
        'how a refresh orthonormalizes the power iterate :math:`LQ`: ``"qr"``, the '
        'authors\' Householder QR; ``"cholesky_qr"``, Cholesky QR repeated until '
        "orthonormal, made of batched products, Cholesky factorizations and triangular "
        "solves (the same Q up to its columns' signs, which the update does not see); "
        '``"auto"``: QR on the CPU (the authors\' arithmetic), Cholesky QR on '
        "GPU and TPU, where QR loops over a batch of blocks (docs/speed.md).",
        rules.choice(*ORTHOGONALIZATIONS),
    )
    first_basis: str = rules.hyperparam(
        "eigh",
        'how the first step builds each basis from its factor :math:`L_1`: ``"eigh"``, its '
        'eigenvectors by decreasing eigenvalue (the authors\' ``eigh``); ``"power"``, a '
        "refresh from the identity: :math:`L_1`'s columns by decreasing diagonal, "
        'orthonormalized by ``orthogonalization``. ``"power"`` compiles no '
        "eigendecomposition, which on a TPU takes minutes for a large factor (docs/speed.md); "
        "its bases then improve with each refresh.",
        rules.choice(*FIRST_BASES),
    )

    # With stagger_refresh, per leaf of the updates (in flattening order), the index of its
    # first refreshed block among those of the whole tree: set by scale_by_soap at each step
    # (see _scale_by_soap); without it (the rule given to scale_by_rule directly), a leaf's
    # blocks are numbered from the leaf's position.
    leaf_starts: tuple[int, ...] | None = dataclasses.field(default=None, repr=False, compare=False)
    # The step's phase where scale_by_soap has chosen it for the whole tree (one of PHASES):
    # every leaf then takes that phase's branch as traced, with no branch of its own. None
    # (the rule given to scale_by_rule directly): each leaf branches on the count.
    phase: str | None = dataclasses.field(default=None, repr=False, compare=False)
    # Where the first step's eigendecompositions and the refreshes' orthonormalizations are
    # made: in each leaf, or stacked for the whole tree by scale_by_soap (solves.stacked).
    solves: Solves = dataclasses.field(default=DIRECT, repr=False, compare=False)
    # Whether the leaves are stacks of blocks (SoapLayout.stacked), as scale_by_soap's
    # stack_blocks steps them (stacks.py).
    stacked: bool = dataclasses.field(default=False, repr=False, compare=False)

    state_type = ScaleBySoapState
    # One pass on a GPU too: a second would rotate the leaf again, and trace its solver calls,
    # which Solves batches across leaves, inside a branch they cannot leave.
    two_passes = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_axis is not None and self.block_size is None:
            raise ValueError(
                f"block_axis={self.block_axis!r} spreads a leaf's blocks over devices: give "
                "block_size too (an integer >= 1)"
            )

    @property
    def layout(self) -> SoapLayout:
        dim = _MAX_PRECOND_DIM if self.max_precond_dim is None else self.max_precond_dim
        return SoapLayout(
            max_precond_dim=dim,
            merge_dims=self.merge_dims,
            precondition_1d=self.precondition_1d,
            block_size=self.block_size,
            block_axis=self.block_axis,
            stacked=self.stacked,
        )

    def with_leaf_starts(self, updates: Any) -> SoapRule:
        """This rule, numbering the blocks of ``updates``' leaves across the whole tree (for
        ``stagger_refresh``): a leaf's first block follows the last of the leaves before it,
        counting blocks with a factor only."""
        starts, total = [], 0
        for leaf in jax.tree.leaves(updates):
            starts.append(total)
            total += self.layout.refreshed_blocks(tuple(jnp.shape(leaf)))
        return dataclasses.replace(self, leaf_starts=tuple(starts))

    def _leaf_start(self, leaf: Leaf) -> int:
        position = leaf.position or 0
        if self.leaf_starts is None or position >= len(self.leaf_starts):
            return position
        return self.leaf_starts[position]

    def _frequency(self) -> int | None:
        """``precondition_frequency`` as a Python integer, or None where it is traced."""
        number = rules.static_float(self.precondition_frequency)
        return None if number is None else int(number)

    def _due(self, scalars: SoapScalars, offset: Any) -> jax.Array | bool:
        """Whether the bases of blocks at refresh ``offset`` are refreshed after this step."""
        if not self.stagger_refresh:
            return scalars.refresh
        count = scalars.count
        return (count > 0) & (jnp.remainder(count - offset, self.precondition_frequency) == 0)

    def moments(self) -> tuple[Moment, ...]:
        return (
            Moment("mu", self.mu_dtype),
            second_moment(self.nu_dtype),
            Moment("gg", FactorStorage(self.layout, _factor_storage(self.factor_dtype))),
            Moment("q", FactorStorage(self.layout, _factor_storage(self.basis_dtype))),
        )

    def _decoded(self, bases: list[jax.Array | None]) -> list[jax.Array | None]:
        """Bases as the step uses them: as loaded, rectified by :meth:`_rectifications`
        Björck iterations (each matrix, or each block's of a batch ``(n, d, d)``)."""
        iterations = self._rectifications()
        if iterations == 0:
            return bases
        return [None if q is None else _rectify(q, iterations) for q in bases]

    def _rectifications(self) -> int:
        """``basis_rectification``, or where None, :func:`bjorck_iterations` of the storage."""
        if self.basis_rectification is None:
            return bjorck_iterations(self.basis_dtype)
        return self.basis_rectification

    def init_fields(self, params: Any) -> dict[str, Any]:
        self.check_params(params)
        return super().init_fields(params)

    @staticmethod
    def check_params(params: Any) -> None:
        """Refuses what SOAP cannot precondition: ``FlatParams`` buffers, complex leaves."""
        leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, FlatParams))
        for leaf in leaves:
            if isinstance(leaf, FlatParams):
                raise ValueError(
                    "soap needs each param in its own shape (a Kronecker factor per "
                    "dimension): FlatParams buffers are not supported"
                )
            if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
                raise ValueError(f"soap has no complex params, got a {leaf.dtype} leaf")

    def scalars(self, fields: dict[str, Any], dtype: Any) -> SoapScalars:
        count = fields["count"]
        t = jnp.maximum(count, 1)  # the Adam step of the authors (the first only initializes)
        number = rules.static_float(self.shampoo_beta)
        if number is None:  # traced (optax.inject_hyperparams): negative means b2
            shampoo_beta = jnp.where(self.shampoo_beta < 0, self.b2, self.shampoo_beta)
        else:
            shampoo_beta = self.b2 if number < 0 else self.shampoo_beta
        wg = 1 - jnp.asarray(shampoo_beta, dtype)
        first: jax.Array | bool
        refresh: jax.Array | bool
        if self.phase is None:
            first, refresh = count == 0, self.refreshes(count)
        else:
            first, refresh = self.phase == "first", self.phase == "refresh"
        return SoapScalars(count, step_scalars(self.b1, self.b2, t)(dtype), wg, first, refresh)

    def refreshes(self, count: jax.Array) -> jax.Array:
        """Whether every basis is refreshed after step ``count`` (without ``stagger_refresh``)."""
        return (count > 0) & (count % self.precondition_frequency == 0)

    def phase_of(self, count: jax.Array) -> jax.Array:
        """The index in :data:`PHASES` of step ``count``'s phase: the first step (which only
        initializes), a step, a step that refreshes every basis after it (never with
        ``stagger_refresh``, whose leaves and blocks refresh at their own offsets)."""
        if self.stagger_refresh:
            return jnp.where(count == 0, 0, 1)
        return jnp.where(count == 0, 0, jnp.where(self.refreshes(count), 2, 1))

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: SoapScalars, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        if jnp.issubdtype(g.dtype, jnp.complexfloating):
            raise ValueError("soap has no complex params")
        shape, working = g.shape, self.layout.shape(g.shape)
        # A stack is stepped as blocks even of one: as the leaves' blocks it holds.
        if self.stacked or self.layout.num_blocks(shape) > 1:
            return self._update_blocks(g, moments, scalars, leaf, self.layout.groups(shape))
        frequency = self._frequency()
        start = self._leaf_start(leaf)
        refresh = self._due(scalars, start if frequency is None else start % frequency)
        d = scalars.adam
        # On Explicit meshes the leaf is preconditioned replicated: the factors contract every
        # other dimension, which sharded operands would leave ambiguous.
        gw = replicated(g).reshape(working)
        mu, nu = replicated(moments["mu"]), replicated(moments["nu"])
        gg, q = replicated(moments["gg"]), replicated(moments["q"])
        outers = [
            None if f is None else _outer(_whole(gw), i)
            for i, f in enumerate(self.layout.unpack(gg, shape))
        ]
        # The average of the whole vector at once, which XLA updates in place (averaged
        # factor by factor and packed, it wrote a new vector and copied it over the old).
        new_gg = average_factors(gg, _pack(outers, gg), scalars.wg)
        factors = self.layout.unpack(new_gg, shape)

        def initialize(operands: Any) -> Any:
            mu, nu, _ = operands
            bases = [None if f is None else self._first_basis(f) for f in factors]
            # The moments are still zeros: in the shape the Adam branch gives them (a reducing
            # storage passes them reduced), which the core reduces back to the same zeros.
            mu, nu = (jnp.broadcast_to(m, jnp.broadcast_shapes(m.shape, shape)) for m in (mu, nu))
            return jnp.zeros(shape, g.dtype), mu, nu, _pack(bases, q)

        def adam_step(operands: Any) -> Any:
            mu, nu, bases_flat = operands
            bases = self._decoded(self.layout.unpack(bases_flat, shape))
            projected = _rotate(gw, bases, back=False).reshape(shape)
            mu, nu, direction = self._adam(projected, mu, nu, d, leaf)
            u = _rotate(direction.reshape(working), bases, back=True).reshape(shape)
            u = self._scaled(u, d)
            mu, nu, bases_flat = branch(
                refresh, self._refresh, lambda *a: a[1:], factors, mu, nu, bases_flat
            )
            return u, mu, nu, bases_flat

        return self._finish(
            g,
            moments,
            scalars,
            leaf,
            branch(scalars.first, initialize, adam_step, (mu, nu, q)),
            new_gg,
        )

    def _first_basis(self, factor: jax.Array) -> jax.Array:
        """The first step's basis of a factor (or of each of a batch), by ``first_basis``."""
        if self.first_basis == "eigh":
            return _eigenbasis(factor, self.solves)
        identity = jnp.broadcast_to(jnp.eye(factor.shape[-1], dtype=factor.dtype), factor.shape)
        return self.solves.refreshed_basis(factor, identity, self.orthogonalization)[1]

    def _adam(
        self, projected: jax.Array, mu: jax.Array, nu: jax.Array, d: StepScalars, leaf: Leaf
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Adam's moments of the gradient ``projected`` into the eigenbasis, and their
        direction there."""
        mu = moving_average(mu, projected, d.w1)
        nu = moving_average(nu, jnp.square(projected), d.w2)
        return mu, nu, mu / (jnp.sqrt(leaf.settle("nu", nu)) + self.eps)

    def _scaled(self, u: jax.Array, d: StepScalars) -> jax.Array:
        """The update rotated back, normalized (``normalize_grads``) and bias-corrected."""
        if self.normalize_grads:
            u = u / (_TINY + jnp.sqrt(jnp.mean(jnp.square(u))))
        if self.correct_bias:
            u = u * (jnp.sqrt(d.c2) / d.c1)
        return u

    def _finish(
        self,
        g: jax.Array,
        moments: dict[str, jax.Array],
        scalars: SoapScalars,
        leaf: Leaf,
        stepped: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
        factors: jax.Array,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The update (none at the first step, which only initializes; weight decay added)
        and the new moments, each in its stored form, from the branch's ``stepped`` (update,
        mu, nu, bases) and the packed ``factors``."""
        u, mu, nu, q = stepped
        if scalars.first is True:
            # The first step keeps nu's zeros, which a reducing storage keeps as the same zeros:
            # settled as the later steps settle it (the core refuses a storage that reduces a
            # moment the step does not settle).
            leaf.settle("nu", nu)
        u = _like(u, g)
        u = jnp.where(scalars.first, jnp.zeros_like(u), leaf.add_decay(u))
        new = {
            "mu": _like(mu, moments["mu"]),
            "nu": _like(nu, moments["nu"]),
            "gg": jax.tree.map(_like, factors, moments["gg"]),
            "q": jax.tree.map(_like, q, moments["q"]),
        }
        return u, new

    def _update_blocks(
        self,
        g: jax.Array,
        moments: dict[str, jax.Array],
        scalars: SoapScalars,
        leaf: Leaf,
        groups: tuple[BlockGroup, ...],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """:meth:`update` of a leaf cut into several blocks: each group of blocks of one shape
        as a batch (its factors and bases ``(n, d, d)``), the moments elementwise; spread over
        ``block_axis``, the blocks' products and refreshes each on its own device, the
        moments in the leaf's shape (rotated there, their blocks gathered)."""
        shape = g.shape
        devices, slots = self.layout.placement(shape)
        axis = self.block_axis if devices > 1 else None
        blocks = _LeafBlocks(groups, self.layout.shape(shape), shape, slots, axis, devices)
        d = scalars.adam
        gw = replicated(g).reshape(blocks.working)
        mu, nu = replicated(moments["mu"]), replicated(moments["nu"])
        gg, q = moments["gg"], moments["q"]
        if axis is None:
            gg, q = jax.tree.map(replicated, (gg, q))
        grads = blocks.split(_whole(gw))

        def accumulate(grads: list[jax.Array], gg: jax.Array, wg: jax.Array) -> jax.Array:
            outers = [
                [None if f is None else _outer_blocks(x, i) for i, f in enumerate(old)]
                for x, old in zip(grads, blocks.parts(gg), strict=True)
            ]
            return average_factors(gg, _pack_groups(outers, gg), wg)

        factors = blocks.blockwise(accumulate, grads, gg, shared=(scalars.wg,))

        def eigenbases(factors: jax.Array, q: jax.Array) -> jax.Array:
            bases = [
                [None if f is None else self._first_basis(f) for f in fs]
                for fs in blocks.parts(factors)
            ]
            return _pack_groups(bases, q)

        def project(grads: list[jax.Array], bases_flat: jax.Array) -> Any:
            bases = [self._decoded(b) for b in blocks.parts(bases_flat)]
            rotated = [_rotate_blocks(x, b, back=False) for x, b in zip(grads, bases, strict=True)]
            return rotated, bases

        def project_back(directions: list[jax.Array], bases: Any) -> list[jax.Array]:
            return [_rotate_blocks(x, b, back=True) for x, b in zip(directions, bases, strict=True)]

        def initialize(operands: Any) -> Any:
            mu, nu, q = operands
            mu, nu = (jnp.broadcast_to(m, jnp.broadcast_shapes(m.shape, shape)) for m in (mu, nu))
            return jnp.zeros(shape, g.dtype), mu, nu, blocks.blockwise(eigenbases, factors, q)

        def adam_step(operands: Any) -> Any:
            mu, nu, bases_flat = operands
            projected, bases = blocks.blockwise(project, grads, bases_flat)
            mu, nu, direction = self._adam(blocks.merge(projected), mu, nu, d, leaf)
            u = blocks.merge(blocks.blockwise(project_back, blocks.split(direction), bases))
            u = self._scaled(u, d)
            mu, nu, bases_flat = self._refresh_groups(
                factors, mu, nu, bases_flat, scalars, leaf, blocks
            )
            return u, mu, nu, bases_flat

        return self._finish(
            g,
            moments,
            scalars,
            leaf,
            branch(scalars.first, initialize, adam_step, (mu, nu, q)),
            factors,
        )

    def _refresh_groups(
        self,
        factors: jax.Array,
        mu: jax.Array,
        nu: jax.Array,
        bases_flat: jax.Array,
        scalars: SoapScalars,
        leaf: Leaf,
        blocks: _LeafBlocks,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The refresh (:func:`_refresh_blocks`) of the blocks due after this step, per group
        of blocks (the moments cut into ``(n, *sizes)``, the factors and bases ``(n, d, d)``):
        the leaf's moments and stored bases after it. The stored bases go on unchanged where
        no refresh replaces them, so that a compressed basis is not re-rounded after each
        rectification.

        Without ``stagger_refresh``, one branch for all the leaf's groups (the steps without
        refresh move nothing between the leaf and its blocks). With it, each group's blocks
        due at the step, so every step carries about the same work: on one device with a
        static ``precondition_frequency`` sliced out of the leaf and written back in place
        (:meth:`_refresh_in_place`), otherwise picked from the groups' batches
        (:meth:`_refresh_due`; spread, each device's among its own)."""
        groups = blocks.groups
        start = self._leaf_start(leaf)
        count = scalars.count
        firsts = list(itertools.accumulate((gr.n for gr in groups), initial=0))
        unchanged = self.basis_dtype is None and self._rectifications() == 0
        settle = None if unchanged else self._settle_blocks

        def computed(ops: Any) -> Any:
            return [
                _refresh_blocks(
                    f, self._decoded(bs), m, v, settle, self.orthogonalization, self.solves
                )
                for f, bs, m, v in ops
            ]

        def unzipped(outs: Any, bases_flat: jax.Array) -> Any:
            """Each group's (bases, mu, nu) as the groups' mus, nus and the bases' vector."""
            new_flat = _pack_groups([list(bs) for bs, _, _ in outs], bases_flat)
            return [m for _, m, _ in outs], [v for _, _, v in outs], new_flat

        def refreshed(factors: jax.Array, bases_flat: jax.Array, mus: Any, nus: Any) -> Any:
            parts = (blocks.parts(factors), blocks.parts(bases_flat), mus, nus)
            return unzipped(computed(zip(*parts, strict=True)), bases_flat)

        def all_due(mu: jax.Array, nu: jax.Array, bases_flat: Any) -> Any:
            mus, nus, new_flat = blocks.blockwise(
                refreshed, factors, bases_flat, blocks.split(mu), blocks.split(nu)
            )
            return blocks.merge(mus), blocks.merge(nus), new_flat

        if not self.stagger_refresh:
            return branch(scalars.refresh, all_due, lambda *ops: ops, mu, nu, bases_flat)
        if blocks.axis is None and self._frequency() is not None:
            return self._refresh_in_place(
                factors, mu, nu, bases_flat, count, start, blocks, computed
            )

        def staggered(
            factors: jax.Array,
            bases_flat: jax.Array,
            mus: Any,
            nus: Any,
            count: jax.Array,
            period: jax.Array,
        ) -> Any:
            # Spread, slot k of device i holds block i * slots + k of its group
            # (SoapLayout.placement): each device picks the due blocks among its own.
            device = 0 if blocks.axis is None else jax.lax.axis_index(blocks.axis)
            ops = zip(blocks.parts(factors), blocks.parts(bases_flat), mus, nus, strict=True)
            outs = []
            for gr, slots, first, op in zip(groups, blocks.slots, firsts[:-1], ops, strict=True):
                offset = start + first + device * slots
                owned = jnp.minimum(slots, gr.n - device * slots)  # the rest: empty slots
                outs.append(self._refresh_due(op, count, period, offset, slots, owned, computed))
            return unzipped(outs, bases_flat)

        # The period passed in, not closed over: shard_map refuses a traced one from outside.
        period = jnp.asarray(self.precondition_frequency)
        mus, nus, new_flat = blocks.blockwise(
            staggered,
            factors,
            bases_flat,
            blocks.split(mu),
            blocks.split(nu),
            shared=(count, period),
        )
        return blocks.merge(mus), blocks.merge(nus), new_flat

    def _refresh_due(
        self,
        op: tuple[Any, Any, jax.Array, jax.Array],
        count: jax.Array,
        period: jax.Array,
        offset: Any,
        slots: int,
        owned: Any,
        computed: Any,
    ) -> tuple[Any, jax.Array, jax.Array]:
        """The bases and moments of a batch of ``slots`` blocks (factors, bases, mu, nu) after
        the refresh of those due at ``count`` (every ``period`` steps): block ``k`` (of the
        first ``owned``, the others empty) at refresh offset ``offset + k``. With a static
        ``precondition_frequency`` the due ones are gathered (``ceil(slots / frequency)``
        every step), refreshed by ``computed`` and put back: all but the last as a batch,
        the last (due at some steps only) in a branch; a traced frequency refreshes the
        batch in a branch taken when any is due."""
        if self._frequency() is None:
            k = jnp.arange(slots)
            due = (jnp.remainder(count - offset - k, period) == 0) & (k < owned)
            new = branch(jnp.any(due), computed, _unrefreshed, [op])[0]
        else:
            index, valid = self._picks(count, offset, slots, owned)
            picked = jax.tree.map(lambda x: x[jnp.minimum(index, slots - 1)], op)
            new = _refresh_picked(picked, valid, computed)
            # Put back by selection, not by a scatter that drops the invalid indices: inside
            # shard_map, XLA:CPU (jaxlib 0.10.2) wrote such a scatter's updates into the
            # blocks of the devices that had none due.
            hit = (jnp.arange(slots)[:, None] == index[None, :]) & valid[None, :]
            due = hit.any(axis=1)
            new = jax.tree.map(lambda y: y[jnp.argmax(hit, axis=1)], new)

        def select(a: jax.Array, b: jax.Array) -> jax.Array:
            return jnp.where(due.reshape(-1, *[1] * (a.ndim - 1)), a, b)

        return jax.tree.map(select, new, op[1:])

    def _picks(
        self, count: jax.Array, offset: Any, slots: int, owned: Any
    ) -> tuple[jax.Array, jax.Array]:
        """The slots of the blocks due at ``count`` among ``slots`` (block ``k`` at refresh
        offset ``offset + k``, due when ``offset + k = count`` modulo the static
        ``precondition_frequency``): ``ceil(slots / frequency)`` indices, and whether each
        holds one of the first ``owned`` blocks."""
        frequency = self._frequency()
        assert frequency is not None
        m = -(-slots // frequency)
        index = jnp.remainder(count - offset, frequency) + frequency * jnp.arange(m)
        return index, index < owned

    def _refresh_in_place(
        self,
        factors: jax.Array,
        mu: jax.Array,
        nu: jax.Array,
        bases_flat: jax.Array,
        count: jax.Array,
        start: int,
        blocks: _LeafBlocks,
        computed: Any,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Staggered refreshes on one device with a static ``precondition_frequency``: each
        group's due blocks sliced out of the leaf's moments and state vectors, refreshed
        (:func:`_refresh_picked`) and written back in place, so that a step moves its due
        blocks alone, not the leaf's whole moments into blocks and back."""
        working = blocks.working
        mu_w, nu_w = mu.reshape(working), nu.reshape(working)
        edge, first = 0, 0
        for gr, factor_part, basis_part in zip(
            blocks.groups, blocks.parts(factors), blocks.parts(bases_flat), strict=True
        ):
            index, valid = self._picks(count, start + first, gr.n, gr.n)
            first += gr.n
            if not gr.stride:  # no factor: the refresh would leave the moments as they are
                continue
            k = jnp.minimum(index, gr.n - 1)
            corners = [_corner(gr, kj) for kj in k]
            picked = (
                [None if x is None else x[k] for x in factor_part],
                [None if x is None else x[k] for x in basis_part],
                jnp.stack([jax.lax.dynamic_slice(mu_w, c, gr.sizes) for c in corners]),
                jnp.stack([jax.lax.dynamic_slice(nu_w, c, gr.sizes) for c in corners]),
            )
            new_bases, new_mu, new_nu = _refresh_picked(picked, valid, computed)
            for j, corner in enumerate(corners):
                mu_w = jax.lax.dynamic_update_slice(mu_w, new_mu[j], corner)
                nu_w = jax.lax.dynamic_update_slice(nu_w, new_nu[j], corner)
                matrices = [None if b is None else b[j] for b in new_bases]
                bases_flat = _with_block(bases_flat, matrices, edge + k[j] * gr.stride, k[j])
            edge += gr.n * gr.stride
        return mu_w.reshape(mu.shape), nu_w.reshape(nu.shape), bases_flat

    def _refresh(
        self, factors: list[jax.Array | None], mu: jax.Array, nu: jax.Array, bases_flat: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The authors' ``get_orthogonal_matrix_QR``: each basis sorted by the estimated
        eigenvalues :math:`\\mathrm{diag}(Q^\\top F Q)` (the second moment permuted alike),
        one power-iteration step :math:`F Q` and the Q of its QR decomposition
        (``orthogonalization``); the first moment moved from the old basis into the new one.
        Its products at full precision, as :func:`_refresh_blocks`'."""
        shape, working = mu.shape, self.layout.shape(mu.shape)
        bases = self._decoded(self.layout.unpack(bases_flat, shape))
        original = at_full_precision(
            functools.partial(_rotate, back=True), mu.reshape(working), bases
        )
        nu = nu.reshape(working)
        new_bases: list[jax.Array | None] = []
        for i, (f, basis) in enumerate(zip(factors, bases, strict=True)):
            if f is None or basis is None:
                new_bases.append(None)
                continue
            order, new_basis = self.solves.refreshed_basis(f, basis, self.orthogonalization)
            nu = jnp.take(nu, order, axis=i)
            new_bases.append(new_basis)
        new_flat = self._as_stored(_pack(new_bases, bases_flat))
        new = self._decoded(self.layout.unpack(new_flat, shape))
        mu = at_full_precision(functools.partial(_rotate, back=False), original, new)
        return mu.reshape(shape), nu.reshape(shape), new_flat

    def _settle_blocks(
        self, bases: list[jax.Array | None]
    ) -> tuple[list[jax.Array | None], list[jax.Array | None]]:
        """New bases of a batch of blocks ``(n, d, d)`` as stored (rounded by
        ``basis_dtype``: a stack's each batch as the state keeps it; a leaf's each block's
        bases one row of a ``(n, stride)`` array, the rounding of the state's vector where its
        blocks of codes align with the rows) and as used (rectified)."""
        if self.stacked:
            batches = [None if b is None else self._as_stored(b) for b in bases]
            return batches, self._decoded(batches)
        present = [b for b in bases if b is not None]
        n = present[0].shape[0]
        rows = self._as_stored(jnp.concatenate([b.reshape(n, -1) for b in present], axis=1))
        stored: list[jax.Array | None] = []
        start = 0
        for b in bases:
            if b is None:
                stored.append(None)
                continue
            stored.append(rows[:, start : start + b[0].size].reshape(b.shape))
            start += b[0].size
        return stored, self._decoded(stored)

    def _as_stored(self, flat: jax.Array) -> jax.Array:
        """New bases ``flat`` (a leaf's vector, or a stack's batch of them) as the next step
        will load them: rounded by ``basis_dtype`` (stored and loaded back), so that the first
        moment is moved into the basis the steps use; unchanged without ``basis_dtype``."""
        storage = _factor_storage(self.basis_dtype)
        if storage is None or flat.size == 0:
            return flat
        vector = jax.ShapeDtypeStruct(flat.shape, flat.dtype)
        return storage.load(storage.store(flat, storage.init(vector))).astype(flat.dtype)


def _unrefreshed(ops: Any) -> Any:
    """The bases and moments of a batch of blocks ``[(factors, bases, mu, nu)]`` as they are."""
    return [ops[0][1:]]


def _refresh_picked(picked: Any, valid: jax.Array, computed: Any) -> Any:
    """``computed`` of the ``m`` gathered blocks ``picked`` (factors, bases, mu, nu): all but
    the last as a batch, the last in a branch taken where it is ``valid``. Where every slot
    holds a block only the last pick can fall past them, so a window refreshes each block
    once, not ``m * precondition_frequency`` blocks."""
    m = valid.shape[0]
    last = jax.tree.map(lambda x: x[m - 1 :], picked)
    new = branch(valid[m - 1], computed, _unrefreshed, [last])[0]
    if m == 1:
        return new
    first = jax.tree.map(lambda x: x[: m - 1], picked)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), computed([first])[0], new)


def _with_block(bases: Any, matrices: list[jax.Array | None], start: Any, k: Any) -> Any:
    """A state's ``bases`` with block ``k``'s bases replaced by ``matrices`` (per dimension,
    None without a factor): in a leaf's vector from ``start``, or at ``k`` in a stack's
    batches."""
    if isinstance(bases, dict):
        new = dict(bases)
        for i, m in enumerate(matrices):
            if m is not None:
                b = bases[dimension_key(i)]
                new[dimension_key(i)] = jax.lax.dynamic_update_index_in_dim(
                    b, m.astype(b.dtype), k, axis=0
                )
        return new
    row = jnp.concatenate([m.reshape(-1) for m in matrices if m is not None])
    return jax.lax.dynamic_update_slice(bases, row.astype(bases.dtype), (start,))


def _corner(group: BlockGroup, k: jax.Array) -> list[jax.Array]:
    """Where block ``k`` of ``group`` (row-major over its ``counts``, as
    :meth:`BlockGroup.split` orders them) starts in the working shape."""
    corner = []
    dims = zip(group.spans, group.counts, group.sizes, strict=True)
    for (a, _), count, size in reversed(list(dims)):
        corner.append(a + (k % count) * size)
        k = k // count
    return corner[::-1]
