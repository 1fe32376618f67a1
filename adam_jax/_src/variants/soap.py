r"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al., 2024).

Shampoo preconditions a matrix gradient :math:`G` by running averages of :math:`GG^\top` and
:math:`G^\top G`. SOAP keeps those averages (one :math:`d \times d` factor per preconditioned
dimension of a tensor), rotates the gradient into their eigenbases, runs Adam there, and
rotates the result back. The eigenbases are refreshed only every ``precondition_frequency``
steps, by one step of power iteration and a QR decomposition, which Adam's moments in the
rotated basis tolerate well.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from adam_jax._src import hyperparams, validation
from adam_jax._src.branching import branch
from adam_jax._src.flat import FlatParams
from adam_jax._src.moving_average import StepScalars, moving_average, step_scalars
from adam_jax._src.numerics import compute_dtype
from adam_jax._src.optimizer_info import OptimizerInfo, Paper
from adam_jax._src.rule import Leaf, Moment, MomentRule, second_moment
from adam_jax._src.storage import MomentStorage
from adam_jax._src.typed_sharding import replicated, replicated_placement, reshard, typed_sharding

# The authors add 1e-30 times the identity before eigh, and to the RMS of normalize_grads.
_TINY = 1e-30
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
        concatenated in dimension order (empty for a leaf with none).
      q: per leaf, their eigenbases, stored alike.
    """

    count: jax.Array  # type: ignore[assignment]  # (optax states name it so too)
    mu: optax.Updates
    nu: optax.Updates
    gg: optax.Updates
    q: optax.Updates


def merged_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """The authors' ``merge_dims``: consecutive dimensions merged while their product stays
    at most ``max_precond_dim`` (a larger dimension stays alone).

    Example:
      >>> from adam_jax._src.variants.soap import merged_shape
      >>> print(merged_shape((2, 2, 4), 4), merged_shape((3, 4), 100))
      (4, 4) (12,)
      >>> print(merged_shape((20000, 3), 100))
      (20000, 3)
    """
    merged: list[int] = []
    current = 1
    for size in shape:
        if current * size > max_precond_dim:
            if current > 1:
                merged.append(current)
                current = size
            else:
                merged.append(size)
                current = 1
        else:
            current *= size
    if current > 1 or not merged:
        merged.append(current)
    return tuple(merged)


@dataclasses.dataclass(frozen=True)
class SoapLayout:
    """Which dimensions of a leaf SOAP preconditions, as the authors decide it."""

    max_precond_dim: int
    merge_dims: bool
    precondition_1d: bool

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the leaf is preconditioned in (merged for ``merge_dims``, tensors of two
        or more dimensions only)."""
        if self.merge_dims and len(shape) >= 2:
            return merged_shape(shape, self.max_precond_dim)
        return tuple(shape)

    def factors(self, shape: tuple[int, ...]) -> tuple[int | None, ...]:
        """Per dimension of :meth:`shape`: the size of its factor, or None (identity)."""
        working = self.shape(shape)
        if len(shape) == 1 and not self.precondition_1d:
            return (None,)
        return tuple(d if d <= self.max_precond_dim else None for d in working)

    def size(self, shape: tuple[int, ...]) -> int:
        """The number of values of the leaf's flattened factors."""
        return sum(d * d for d in self.factors(shape) if d is not None)

    def unpack(self, flat: Any, shape: tuple[int, ...]) -> list[Any]:
        """A leaf's factors (or eigenbases) from their flattened concatenation (the state's
        ``gg`` or ``q`` of a leaf of ``shape``): per dimension of :meth:`shape`, a ``d x d``
        matrix, or None.

        Example:
          >>> import numpy as np
          >>> from adam_jax._src.variants.soap import SoapLayout
          >>> layout = SoapLayout(max_precond_dim=3, merge_dims=False, precondition_1d=False)
          >>> [None if q is None else q.shape for q in layout.unpack(np.arange(9), (4, 3))]
          [None, (3, 3)]
        """
        out: list[Any] = []
        start = 0
        for d in self.factors(shape):
            if d is None:
                out.append(None)
            else:
                out.append(flat[start : start + d * d].reshape(d, d))
                start += d * d
        return out


@dataclasses.dataclass(frozen=True)
class FactorStorage(MomentStorage):
    """The Kronecker factors (or their eigenbases) of each leaf, flattened into one vector in
    the compute dtype (at least float32), replicated where the param is sharded."""

    layout: SoapLayout

    def init(self, param: Any) -> jax.Array:
        size = self.layout.size(tuple(param.shape))
        return jnp.zeros((size,), compute_dtype(param.dtype), device=replicated_placement(param))

    def load(self, stored: jax.Array) -> jax.Array:
        return stored

    def store(self, value: jax.Array, stored: jax.Array) -> jax.Array:
        return value.astype(stored.dtype)


def _whole(x: jax.Array) -> jax.Array:
    """``x`` replicated on Auto mesh axes (constrained so under ``jit``, moved so eagerly),
    where the compiler would otherwise split a factor's sum over a sharded dimension: the
    factors would be summed in another order than on one device."""
    if isinstance(x, jax.core.Tracer):
        sharding = jax.typeof(x).sharding
        if isinstance(sharding, NamedSharding) and not sharding.mesh.empty:
            return jax.lax.with_sharding_constraint(
                x, NamedSharding(sharding.mesh, PartitionSpec())
            )
    elif isinstance(x, jax.Array):
        placed = x.sharding
        if isinstance(placed, NamedSharding) and not placed.is_fully_replicated:
            whole = NamedSharding(placed.mesh, PartitionSpec(), memory_kind=placed.memory_kind)
            return jax.device_put(x, whole)
    return x


def _like(x: jax.Array, other: jax.Array) -> jax.Array:
    """``x`` with ``other``'s typed sharding (if any)."""
    return reshard(x, typed_sharding(other))


def _pack(matrices: list[jax.Array | None], like: jax.Array) -> jax.Array:
    """The flattened concatenation of a leaf's factors (``like``, empty, where it has none)."""
    parts = [m.reshape(-1) for m in matrices if m is not None]
    return jnp.concatenate(parts) if parts else like


def _rotate(x: jax.Array, bases: list[jax.Array | None], back: bool) -> jax.Array:
    """``x`` (in the working shape) times each basis on its dimension: :math:`Q^\\top` into the
    eigenbasis, :math:`Q` back (the authors' ``project`` and ``project_back``)."""
    for q in bases:
        if q is None:
            x = jnp.moveaxis(x, 0, -1)
        else:
            x = jnp.tensordot(x, q, axes=([0], [1 if back else 0]))
    return x


def _outer(g: jax.Array, i: int) -> jax.Array:
    """:math:`G_{(i)} G_{(i)}^\\top`: the contraction of ``g`` with itself over every dimension
    but ``i``."""
    others = [k for k in range(g.ndim) if k != i]
    return jnp.tensordot(g, g, axes=(others, others))


def _eigenbasis(factor: jax.Array) -> jax.Array:
    """The eigenvectors of a factor by decreasing eigenvalue (the authors' ``eigh`` of
    ``factor + 1e-30 I``, reading its lower triangle as torch does)."""
    shifted = factor + _TINY * jnp.eye(factor.shape[0], dtype=factor.dtype)
    _, vectors = jnp.linalg.eigh(shifted, UPLO="L", symmetrize_input=False)
    return vectors[:, ::-1]


class SoapScalars(NamedTuple):
    """Per-step scalars of SOAP: the step count, Adam's weights and corrections at
    :math:`t` = ``count``, the factors' weight :math:`1-\\beta_s` and whether the bases are
    refreshed after this step."""

    count: jax.Array  # type: ignore[assignment]  # (optax states name it so too)
    adam: StepScalars
    wg: Any
    refresh: jax.Array


def _check_shampoo_beta(name: str, value: Any) -> None:
    number = validation.static_float(value)
    if number is not None and not (number < 1.0 and math.isfinite(number)):
        raise ValueError(f"{name} must be in [0, 1), or negative for b2, got {value!r}")


def _check_max_precond_dim(name: str, value: Any) -> None:
    """None, or a Python integer >= 1 (it fixes the factors' shapes: no array, no float)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SoapRule(MomentRule):
    """SOAP's moment rule: see :func:`scale_by_soap`."""

    b1: Any = hyperparams.b1(0.95)
    b2: Any = hyperparams.b2(0.95)
    shampoo_beta: Any = hyperparams.hyperparam(
        -1.0,
        r"decay :math:`\beta_s` of the Kronecker factors, in [0, 1); negative (the authors' "
        "-1) uses ``b2``.",
        _check_shampoo_beta,
    )
    eps: Any = hyperparams.eps()
    precondition_frequency: Any = hyperparams.hyperparam(
        10, "steps between refreshes of the eigenbases, an integer >= 1.", hyperparams.integer(1)
    )
    max_precond_dim: int | None = hyperparams.hyperparam(
        None,
        "dimensions larger than this get no factor (the identity), an integer >= 1; ``None`` "
        "is the authors' 10000. ``None`` rather than a number because "
        "``optax.inject_hyperparams`` would inject a number as an array, and this fixes "
        'shapes: pass ``static_args=("max_precond_dim",)`` to set it there.',
        _check_max_precond_dim,
    )
    merge_dims: bool = hyperparams.hyperparam(
        False,
        "merge consecutive dimensions of tensors of two or more dimensions while their product "
        "stays at most ``max_precond_dim`` (the authors' ``merge_dims``).",
    )
    precondition_1d: bool = hyperparams.hyperparam(False, "give 1-D leaves a factor too.")
    normalize_grads: bool = hyperparams.hyperparam(
        False, r"divide each leaf's direction by :math:`10^{-30}` plus its RMS."
    )
    correct_bias: bool = hyperparams.hyperparam(
        True, r"Adam's bias correction, in the step size: :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`."
    )
    mu_dtype: Any = hyperparams.mu_dtype()
    nu_dtype: Any = hyperparams.nu_dtype()

    state_type = ScaleBySoapState

    @property
    def layout(self) -> SoapLayout:
        dim = _MAX_PRECOND_DIM if self.max_precond_dim is None else self.max_precond_dim
        return SoapLayout(
            max_precond_dim=dim,
            merge_dims=self.merge_dims,
            precondition_1d=self.precondition_1d,
        )

    def moments(self) -> tuple[Moment, ...]:
        factors = FactorStorage(self.layout)
        return (
            Moment("mu", self.mu_dtype),
            second_moment(self.nu_dtype),
            Moment("gg", factors),
            Moment("q", factors),
        )

    def init_fields(self, params: Any) -> dict[str, Any]:
        leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, FlatParams))
        for leaf in leaves:
            if isinstance(leaf, FlatParams):
                raise ValueError(
                    "soap needs each param in its own shape (a Kronecker factor per "
                    "dimension): FlatParams buffers are not supported"
                )
            if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
                raise ValueError(f"soap has no complex params, got a {leaf.dtype} leaf")
        return super().init_fields(params)

    def scalars(self, fields: dict[str, Any], dtype: Any) -> SoapScalars:
        count = fields["count"]
        t = jnp.maximum(count, 1)  # the Adam step of the authors (the first only initializes)
        number = validation.static_float(self.shampoo_beta)
        if number is None:  # traced (optax.inject_hyperparams): negative means b2
            shampoo_beta = jnp.where(self.shampoo_beta < 0, self.b2, self.shampoo_beta)
        else:
            shampoo_beta = self.b2 if number < 0 else self.shampoo_beta
        wg = 1 - jnp.asarray(shampoo_beta, dtype)
        refresh = (count > 0) & (count % self.precondition_frequency == 0)
        return SoapScalars(count, step_scalars(self.b1, self.b2, t)(dtype), wg, refresh)

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: SoapScalars, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        if jnp.issubdtype(g.dtype, jnp.complexfloating):
            raise ValueError("soap has no complex params")
        shape, working = g.shape, self.layout.shape(g.shape)
        d = scalars.adam
        # On Explicit meshes the leaf is preconditioned replicated: the factors contract every
        # other dimension, which sharded operands would leave ambiguous.
        gw = replicated(g).reshape(working)
        mu, nu = replicated(moments["mu"]), replicated(moments["nu"])
        gg, q = replicated(moments["gg"]), replicated(moments["q"])
        factors = [
            None if f is None else moving_average(f, _outer(_whole(gw), i), scalars.wg)
            for i, f in enumerate(self.layout.unpack(gg, shape))
        ]

        def initialize(operands: Any) -> Any:
            mu, nu, _ = operands
            bases = [None if f is None else _eigenbasis(f) for f in factors]
            # The moments are still zeros: in the shape the Adam branch gives them (a reducing
            # storage passes them reduced), which the core reduces back to the same zeros.
            mu, nu = (jnp.broadcast_to(m, jnp.broadcast_shapes(m.shape, shape)) for m in (mu, nu))
            return jnp.zeros(shape, g.dtype), mu, nu, _pack(bases, q)

        def adam_step(operands: Any) -> Any:
            mu, nu, bases_flat = operands
            bases = self.layout.unpack(bases_flat, shape)
            projected = _rotate(gw, bases, back=False).reshape(shape)
            mu = moving_average(mu, projected, d.w1)
            nu = moving_average(nu, jnp.square(projected), d.w2)
            direction = mu / (jnp.sqrt(leaf.settle("nu", nu)) + self.eps)
            u = _rotate(direction.reshape(working), bases, back=True).reshape(shape)
            if self.normalize_grads:
                u = u / (_TINY + jnp.sqrt(jnp.mean(jnp.square(u))))
            if self.correct_bias:
                u = u * (jnp.sqrt(d.c2) / d.c1)
            mu, nu, bases_flat = branch(
                scalars.refresh, self._refresh, lambda *a: a[1:], factors, mu, nu, bases_flat
            )
            return u, mu, nu, bases_flat

        u, new_mu, new_nu, new_q = branch(scalars.count == 0, initialize, adam_step, (mu, nu, q))
        u = _like(u, g)
        u = jnp.where(scalars.count == 0, jnp.zeros_like(u), leaf.add_decay(u))
        new = {
            "mu": _like(new_mu, moments["mu"]),
            "nu": _like(new_nu, moments["nu"]),
            "gg": _like(_pack(factors, gg), moments["gg"]),
            "q": _like(new_q, moments["q"]),
        }
        return u, new

    def _refresh(
        self, factors: list[jax.Array | None], mu: jax.Array, nu: jax.Array, bases_flat: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The authors' ``get_orthogonal_matrix_QR``: each basis sorted by the estimated
        eigenvalues :math:`\\mathrm{diag}(Q^\\top F Q)` (the second moment permuted alike),
        one power-iteration step :math:`F Q` and a QR decomposition; the first moment moved
        from the old basis into the new one."""
        shape, working = mu.shape, self.layout.shape(mu.shape)
        bases = self.layout.unpack(bases_flat, shape)
        original = _rotate(mu.reshape(working), bases, back=True)
        nu = nu.reshape(working)
        new_bases: list[jax.Array | None] = []
        for i, (f, basis) in enumerate(zip(factors, bases, strict=True)):
            if f is None or basis is None:
                new_bases.append(None)
                continue
            estimated = jnp.sum(basis * (f @ basis), axis=0)
            order = jnp.argsort(estimated, descending=True)
            nu = jnp.take(nu, order, axis=i)
            new_bases.append(jnp.linalg.qr(f @ basis[:, order])[0])
        mu = _rotate(original, new_bases, back=False)
        return mu.reshape(shape), nu.reshape(shape), _pack(new_bases, bases_flat)


@hyperparams.transformation(SoapRule, positional=("b1", "b2", "shampoo_beta", "eps"), decay=True)
def scale_by_soap() -> None:
    r"""Rescales gradients by SOAP: Adam in the eigenbasis of Shampoo's preconditioner
    (Vyas et al., 2024, Algorithms 2 and 3).

    For each leaf :math:`G_t` (viewed in its working shape, see ``merge_dims``) and each of its
    preconditioned dimensions :math:`i` (size at most ``max_precond_dim``; 1-D leaves only with
    ``precondition_1d``, scalars never), a Kronecker factor and its eigenbasis:

    .. math::
        L^{(i)}_t = \beta_s L^{(i)}_{t-1} + (1-\beta_s)\, G_{(i)} G_{(i)}^\top, \qquad
        \tilde G = G \times_1 Q^{(1)\top} \cdots \times_k Q^{(k)\top},

    (:math:`G_{(i)}` the unfolding of :math:`G` along :math:`i`, :math:`\times_i` the product
    along dimension :math:`i`, the identity for a dimension without factor), then Adam in the
    rotated basis, rotated back:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) \tilde G_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) \tilde G_t^2, \\
        u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
        \Big(\frac{m_t}{\sqrt{v_t} + \epsilon}\Big) \times_1 Q^{(1)} \cdots \times_k Q^{(k)}
        + \lambda_t \theta_{t-1}.

    The first call only sets :math:`L_1` and :math:`Q = \mathrm{eigh}(L_1)` (eigenvectors by
    decreasing eigenvalue) and returns a zero update; Adam's step :math:`t` counts from the
    second call. After every step whose :math:`t` is a multiple of ``precondition_frequency``,
    each basis is refreshed by one power-iteration step: the columns of :math:`Q` sorted by
    :math:`\mathrm{diag}(Q^\top L Q)` decreasing (and :math:`v` permuted alike), then
    :math:`Q \leftarrow \mathrm{qr}(L Q)`, and :math:`m` moved into the new basis. The
    refresh is a branch of the compiled step (no host round trip). Without ``correct_bias``
    the factor :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)` is 1; with ``normalize_grads`` the
    rotated-back direction is divided by :math:`10^{-30}` plus its RMS first.

    Factors and bases are kept per leaf in the compute dtype (at least float32), flattened
    (state fields ``gg`` and ``q``); on Explicit meshes each leaf is preconditioned
    replicated (ZeRO-1 may shard the stored state). ``FlatParams`` buffers and complex params
    are refused. Unlike the authors' code, ``eigh`` and QR run in that compute dtype (the
    authors' in float32 whatever the params'), and their ``data_format`` (channels-last
    convolutions) is not offered: in JAX the layout is the param's.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleBySoapState`.

    References:
      Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson and Kakade, `SOAP: Improving
      and Stabilizing Shampoo using Adam <https://arxiv.org/abs/2409.11321>`_, ICLR 2025; the
      authors' code, https://github.com/nikhilvyas/SOAP.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_soap()
      >>> params = jnp.zeros((2, 2))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([[1.0, 0.0], [0.0, 2.0]]), state)
      >>> print(jnp.abs(updates).max())  # the first call only builds the bases
      0.0
      >>> updates, state = tx.update(jnp.array([[1.0, 0.0], [0.0, 2.0]]), state)
      >>> print(jnp.round(updates, 4))  # then Adam's first step in their eigenbasis: signs
      [[1. 0.]
       [0. 1.]]
    """


@hyperparams.optimizer(scale_by_soap, defaults={"weight_decay": 0.01})
def soap() -> None:
    r"""SOAP (Vyas et al., 2024): Adam in the eigenbasis of Shampoo's preconditioner, with
    decoupled weight decay.

    .. math::
        \theta_t = \theta_{t-1} - \eta_t \big(u_t + \lambda_t \theta_{t-1}\big),

    with :math:`u_t` of :func:`scale_by_soap` (zero at the first step, which only builds the
    eigenbases: no decay either). The defaults are the authors' (``lr=3e-3`` aside, which
    is yours to give). The decay is optax's AdamW's, on the params before the step, where the
    authors' code multiplies the params after the step by :math:`1-\eta\lambda`, which scales
    the step by :math:`1-\eta\lambda` too.

    Returns:
      An ``optax.GradientTransformation`` (a chain ending in the learning rate).

    References:
      Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
      <https://arxiv.org/abs/2409.11321>`_, ICLR 2025; the authors' code,
      https://github.com/nikhilvyas/SOAP.

    Example:
      >>> import adam_jax, jax, jax.numpy as jnp, optax
      >>> tx = adam_jax.soap(3e-2, weight_decay=0.0)
      >>> params = jnp.array([[2.0, -1.0], [0.5, 1.0]])
      >>> loss = lambda p: jnp.sum(p**2)
      >>> state = tx.init(params)
      >>> for _ in range(50):
      ...     updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(round(float(loss(params)), 3))  # from 6.25
      0.646
    """


REGISTRY_ROWS = (
    OptimizerInfo(
        name="soap",
        alias=soap,
        group="variant",
        summary="Adam in the eigenbasis of Shampoo's Kronecker factors, refreshed every few steps",
        paper=Paper(
            authors="Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson and Kakade",
            title="SOAP: Improving and Stabilizing Shampoo using Adam",
            url="https://arxiv.org/abs/2409.11321",
            venue="ICLR 2025",
        ),
        transformation=scale_by_soap,
        rule=SoapRule,
        # The default rate (3e-3): the authors' default, not tuned on the MNIST example.
    ),
)
