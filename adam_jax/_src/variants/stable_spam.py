r"""Stable-SPAM: SPAM with adaptive spike clipping and gradient-norm scaling (Huang et al., 2025).

Low-precision (4-bit) training makes gradient norms unstable. Stable-SPAM keeps, per tensor,
a running average of its largest gradient entry and clips entries above the (bias-corrected)
average back to it; rescales the clipped gradient to a norm of
:math:`\hat m_{\|g\|} / \sqrt{\hat v_{\|g\|}}`, the ratio of the running averages of its norm
and squared norm; and, as SPAM, resets Adam's moments every ``update_proj_gap`` steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adam_jax import rules
from adam_jax.rules import (
    Leaf,
    Mask,
    Moment,
    MomentRule,
    MomentStorage,
    OptimizerInfo,
    Paper,
    abs_sq,
    block_means,
    compute_dtype,
    descend,
    moving_average,
    moving_average_terms,
    real_dtype,
    scale_by_rule,
    second_moment,
)


class ScaleByStableSpamState(NamedTuple):
    """Stable-SPAM's state: the step count; Adam's moments ``mu`` and ``nu``; per tensor, the
    running averages of the gradient's norm (``m_norm``), of its square (``v_norm``) and of
    its largest entry (``m_max``), each one value of shape ``(1,) * ndim``; and with
    ``amsgrad=True`` the running maximum of ``nu`` (``nu_max``, else ``None``)."""

    count: jax.Array  # type: ignore[assignment]  # a field, as optax's states have
    mu: optax.Updates
    nu: optax.Updates
    m_norm: optax.Updates
    v_norm: optax.Updates
    m_max: optax.Updates
    nu_max: Any


@dataclasses.dataclass(frozen=True)
class TensorScalarStorage(MomentStorage):
    """One value per tensor, of shape ``(1,) * ndim`` (it broadcasts against the param), in
    the compute dtype (at least float32). A reducing storage: the rule hands it a value
    constant over the tensor (or of that one value's shape) and settles it."""

    reduces = True

    def init(self, param: Any) -> jax.Array:
        # One block of the tensor's shape: its (1,) * ndim zeros, placed as block means are.
        whole = tuple(max(int(n), 1) for n in param.shape)
        return block_means(whole, compute_dtype(param.dtype)).init(param)

    def load(self, stored: jax.Array) -> jax.Array:
        return stored

    def project(self, value: jax.Array, stored: jax.Array) -> jax.Array:
        return self._one(value, stored)

    def store(self, value: jax.Array, stored: jax.Array) -> jax.Array:
        one = self._one(value, stored).astype(stored.dtype)
        # Eagerly, where the state was placed (its shape is replicated on any mesh).
        eager = not isinstance(one, jax.core.Tracer) and not isinstance(stored, jax.core.Tracer)
        if eager and isinstance(stored, jax.Array) and stored.committed:
            return jax.device_put(one, stored.sharding)
        return one

    @staticmethod
    def _one(value: jax.Array, stored: jax.Array) -> jax.Array:
        """The tensor's value: ``value`` holds it in every entry."""
        if value.size == 0:
            return jnp.zeros(stored.shape, value.dtype)
        return value.reshape(-1)[:1].reshape(stored.shape)


class StableSpamScalars(NamedTuple):
    """One step's scalars: the weights of the moments (:math:`1 - \\beta_1 s`,
    :math:`1 - \\beta_2`) and of the norm averages (:math:`1 - \\gamma_1 s`,
    :math:`1 - \\gamma_2`, :math:`1 - \\gamma_3`), their bias corrections, and whether the
    moments restart from zero."""

    w1: Any
    w2: Any
    c1: jax.Array
    c2: jax.Array
    w_norm: Any
    w_sq: Any
    w_max: Any
    c_norm: jax.Array
    c_sq: jax.Array
    c_max: jax.Array
    reset: jax.Array


def cosine_scale(t: Any, total_t: Any, eta_min: Any, dtype: Any = jnp.float32) -> jax.Array:
    r"""The authors' factor of :math:`\gamma_1` and :math:`\beta_1` at the 1-based step ``t``:
    :math:`\eta + (1 - \eta)(1 + \cos(\pi t / (T + 1))) / 2` (``CosineDecay(1.0, T, eta)``,
    evaluated in closed form at every step, so it rises again after :math:`T + 1`)."""
    t = jnp.asarray(t).astype(dtype)
    eta = jnp.asarray(eta_min).astype(dtype)
    angle = jnp.pi * t / (jnp.asarray(total_t).astype(dtype) + 1)
    return eta + (1 - eta) * (1 + jnp.cos(angle)) / 2


def _check_gamma1(name: str, value: Any) -> None:
    number = rules.static_float(value)
    if number is not None and number != -1.0 and not 0.0 <= number < 1.0:
        raise ValueError(f"{name} must be in [0, 1), or -1 for b1, got {value!r}")


def _check_total_t(name: str, value: Any) -> None:
    if value is not None:
        rules.check_integer(name, value, 1)


def _check_eta_min(name: str, value: Any) -> None:
    number = rules.static_float(value)
    if number is not None and not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StableSpamRule(MomentRule):
    """Stable-SPAM's moment rule: see :func:`scale_by_stable_spam`."""

    b1: Any = rules.b1()
    b2: Any = rules.b2()
    eps: Any = rules.hyperparam(
        1e-8,
        "added to the denominators (the moments' and the norm scaling's), >= 0.",
        rules.check_non_negative,
    )
    gamma1: Any = rules.hyperparam(
        0.7,
        r":math:`\gamma_1`, decay of the norm's average, in [0, 1), or -1 for ``b1``.",
        _check_gamma1,
    )
    gamma2: Any = rules.hyperparam(
        0.9,
        r":math:`\gamma_2`, decay of the squared norm's average, in [0, 1).",
        rules.check_decay,
    )
    gamma3: Any = rules.hyperparam(
        0.999,
        r":math:`\gamma_3`, decay of the largest entry's average (the authors' ``theta``), "
        "in [0, 1).",
        rules.check_decay,
    )
    total_t: Any = rules.hyperparam(
        None,
        r":math:`T`, the steps of the cosine decay of :math:`\gamma_1` and :math:`\beta_1` "
        "(the run's length), an integer >= 1, or ``None`` for none.",
        _check_total_t,
    )
    eta_min: Any = rules.hyperparam(
        0.5, r":math:`\eta`, the cosine's floor, in [0, 1].", _check_eta_min
    )
    update_proj_gap: Any = rules.hyperparam(
        1000,
        "steps between moment resets, an integer >= 0 (0: no resets).",
        rules.integer(0),
    )
    amsgrad: bool = rules.hyperparam(False, "divide by the running maximum of the second moment.")
    restart_norm_count: bool = rules.hyperparam(
        True,
        r"the bias corrections of :math:`M`, :math:`a` and :math:`b` count from each reset, as "
        "the authors' code does (``False``: from the start).",
    )
    mu_dtype: Any = rules.mu_dtype()
    nu_dtype: Any = rules.hyperparam(
        None, "storage of the second moment (and its maximum), as ``mu_dtype``."
    )

    state_type = ScaleByStableSpamState

    def moments(self) -> tuple[Moment, ...]:
        scalar = TensorScalarStorage()
        maximum = (second_moment(self.nu_dtype, "nu_max"),) if self.amsgrad else ()
        return (
            Moment("mu", self.mu_dtype),
            second_moment(self.nu_dtype),
            Moment("m_norm", scalar, real=True),
            Moment("v_norm", scalar, real=True),
            Moment("m_max", scalar, real=True),
            *maximum,
        )

    def scalars(self, fields: dict[str, Any], dtype: Any) -> StableSpamScalars:
        t = optax.safe_increment(fields["count"])
        gap = self.update_proj_gap
        resets = jnp.asarray(gap) != 0
        safe_gap = jnp.where(resets, gap, 1)
        reset = resets & (t % safe_gap == 0)
        # The authors' per-param step: set to 1 at a reset, so the next steps count
        # 2, 3, ... (the clipping maximum and the norm averages are not reset).
        last = safe_gap * ((t - 1) // safe_gap)
        since = jnp.where(resets & (last >= safe_gap), 1 + t - last, t)
        n = since if self.restart_norm_count else t
        step = jnp.where(reset, 1, since)
        if self.total_t is None:
            b1, gamma1 = self.b1, self._gamma1()
        else:
            scale = cosine_scale(t, self.total_t, self.eta_min, dtype)
            b1, gamma1 = self.b1 * scale, self._gamma1() * scale
        w1, c1 = moving_average_terms(b1, step, dtype)
        w2, c2 = moving_average_terms(self.b2, step, dtype)
        w_norm, c_norm = moving_average_terms(gamma1, n, dtype)
        w_sq, c_sq = moving_average_terms(self.gamma2, n, dtype)
        w_max, c_max = moving_average_terms(self.gamma3, n, dtype)
        return StableSpamScalars(w1, w2, c1, c2, w_norm, w_sq, w_max, c_norm, c_sq, c_max, reset)

    def _gamma1(self) -> Any:
        """:math:`\\gamma_1`, ``b1`` where it is -1 (the authors' convention)."""
        number = rules.static_float(self.gamma1)
        if number is None:
            return jnp.where(jnp.asarray(self.gamma1) == -1, self.b1, self.gamma1)
        return self.b1 if number == -1 else self.gamma1

    def update(
        self,
        g: jax.Array,
        moments: dict[str, jax.Array],
        scalars: StableSpamScalars,
        leaf: Leaf,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        d = scalars
        rdtype = real_dtype(g.dtype)
        magnitude = jnp.abs(g)
        # Adaptive spike clipping: entries above the average largest entry come down to it.
        largest = leaf.max(magnitude)
        m_max = leaf.settle("m_max", moving_average(moments["m_max"], largest, d.w_max))
        bound = m_max / d.c_max
        spike = magnitude > bound
        factor = bound / jnp.where(spike, largest, 1.0)
        g = jnp.where(spike, g * factor.astype(g.dtype), g)
        # Norm scaling: the clipped gradient gets the norm m_hat / (sqrt(v_hat) + eps).
        norm = jnp.sqrt(leaf.sum(abs_sq(g)))
        m_norm = leaf.settle("m_norm", moving_average(moments["m_norm"], norm, d.w_norm))
        v_norm = leaf.settle("v_norm", moving_average(moments["v_norm"], norm**2, d.w_sq))
        target = (m_norm / d.c_norm) / (jnp.sqrt(v_norm / d.c_sq) + self.eps)
        positive = norm > 0
        rescale = jnp.where(positive, target / jnp.where(positive, norm, 1.0), 1.0)
        g = g * rescale.astype(g.dtype)
        # Adam on the scaled gradient, its moments restarted at each reset.
        # A select of the scalar 0, which XLA fuses (of zeros_like it copied each moment).
        mu = jnp.where(d.reset, 0.0, moments["mu"]).astype(moments["mu"].dtype)
        nu = jnp.where(d.reset, 0.0, moments["nu"]).astype(moments["nu"].dtype)
        mu = moving_average(mu, g, d.w1)
        nu = moving_average(nu, abs_sq(g), d.w2)
        new = {"mu": mu, "nu": nu, "m_norm": m_norm, "v_norm": v_norm, "m_max": m_max}
        second = leaf.settle("nu", nu)
        if self.amsgrad:
            new["nu_max"] = second = leaf.settle("nu_max", jnp.maximum(moments["nu_max"], second))
        denominator = jnp.sqrt(second) / jnp.sqrt(d.c2) + jnp.asarray(self.eps, rdtype)
        return leaf.add_decay(leaf.settle("mu", mu) / denominator / d.c1), new

    def to_state(self, fields: dict[str, Any]) -> ScaleByStableSpamState:
        values: dict[str, Any] = {name: fields.get(name) for name in ScaleByStableSpamState._fields}
        return ScaleByStableSpamState(**values)

    def from_state(self, state: Any) -> dict[str, Any]:
        return {name: value for name, value in state._asdict().items() if value is not None}


def scale_by_stable_spam(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    *,
    gamma1: float | jax.Array = 0.7,
    gamma2: float | jax.Array = 0.9,
    gamma3: float | jax.Array = 0.999,
    total_t: int | None = None,
    eta_min: float | jax.Array = 0.5,
    update_proj_gap: int = 1000,
    amsgrad: bool = False,
    restart_norm_count: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by Stable-SPAM's estimates (Huang et al., 2025, Algorithm 1).

    Per tensor, at the 1-based step :math:`t`, with :math:`n` the steps since the last
    moment reset plus one (:math:`t` before the first reset; ``restart_norm_count=False``:
    :math:`t` always) and :math:`s_t` the cosine factor of ``total_t`` (1 without it):

    .. math::
        M_t = \gamma_3 M_{t-1} + (1-\gamma_3) \max_i |g_i|, \qquad
        \hat M_t = M_t / (1 - \gamma_3^n), \\
        \tilde g_i = g_i \hat M_t / \max_j |g_j| \ \text{ where } |g_i| > \hat M_t, \\
        a_t = \gamma_1 s_t\, a_{t-1} + (1 - \gamma_1 s_t) \|\tilde g\|, \qquad
        b_t = \gamma_2 b_{t-1} + (1 - \gamma_2) \|\tilde g\|^2, \\
        \bar g = \frac{\tilde g}{\|\tilde g\|} \cdot
        \frac{a_t / (1 - (\gamma_1 s_t)^n)}{\sqrt{b_t / (1 - \gamma_2^n)} + \epsilon}, \\
        m = \beta_1 s_t m + (1 - \beta_1 s_t) \bar g, \qquad
        v = \beta_2 v + (1 - \beta_2) \bar g^2, \\
        u_t = \frac{m}{1 - (\beta_1 s_t)^{k}} \Big/
        \left(\frac{\sqrt{v}}{\sqrt{1 - \beta_2^{k}}} + \epsilon\right),

    where :math:`m` and :math:`v` restart from zero, and the Adam count :math:`k` from 1,
    every ``update_proj_gap`` steps (:math:`k = n` otherwise); a zero norm leaves
    :math:`\tilde g` unscaled. :math:`s_t = \eta + (1 - \eta)(1 + \cos(\pi t/(T + 1)))/2`
    with :math:`T` = ``total_t``, :math:`\eta` = ``eta_min``. ``amsgrad=True`` divides by the
    running maximum of :math:`v` (never reset) instead.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominators (the moments' and the norm scaling's), >= 0.
      gamma1: :math:`\gamma_1`, decay of the norm's average, in [0, 1), or -1 for ``b1``.
      gamma2: :math:`\gamma_2`, decay of the squared norm's average, in [0, 1).
      gamma3: :math:`\gamma_3`, decay of the largest entry's average (the authors' ``theta``), in
        [0, 1).
      total_t: :math:`T`, the steps of the cosine decay of :math:`\gamma_1` and :math:`\beta_1` (the
        run's length), an integer >= 1, or ``None`` for none.
      eta_min: :math:`\eta`, the cosine's floor, in [0, 1].
      update_proj_gap: steps between moment resets, an integer >= 0 (0: no resets).
      amsgrad: divide by the running maximum of the second moment.
      restart_norm_count: the bias corrections of :math:`M`, :math:`a` and :math:`b` count from each
        reset, as the authors' code does (``False``: from the start).
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment (and its maximum), as ``mu_dtype``.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByStableSpamState`.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_stable_spam()
      >>> updates, state = tx.update(jnp.array([3.0, -0.5]), tx.init(jnp.zeros(2)))
      >>> print(jnp.round(updates, 3))  # the first step is the sign of the gradient
      [ 1. -1.]
    """
    return scale_by_rule(
        StableSpamRule(
            b1=b1,
            b2=b2,
            eps=eps,
            gamma1=gamma1,
            gamma2=gamma2,
            gamma3=gamma3,
            total_t=total_t,
            eta_min=eta_min,
            update_proj_gap=update_proj_gap,
            amsgrad=amsgrad,
            restart_norm_count=restart_norm_count,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        weight_decay=weight_decay,
        mask=mask,
    )


def stable_spam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    *,
    gamma1: float | jax.Array = 0.7,
    gamma2: float | jax.Array = 0.9,
    gamma3: float | jax.Array = 0.999,
    total_t: int | None = None,
    eta_min: float | jax.Array = 0.5,
    update_proj_gap: int = 1000,
    amsgrad: bool = False,
    restart_norm_count: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""Stable-SPAM (Huang et al., 2025), as the authors' ``StableSPAM``.

    With :math:`u_t` the direction of :func:`adam_jax.scale_by_stable_spam` and
    :math:`\gamma_t`, :math:`\lambda_t` the learning rate and weight decay of the step:
    :math:`\theta_t = (1 - \gamma_t \lambda_t)\theta_{t-1} - \gamma_t u_t` (the authors'
    decay, of the params before the step, times the rate). The defaults are the authors'
    (``eps=1e-8``, ``gamma1=0.7``, ``gamma2=0.9``, ``gamma3=0.999``, ``eta_min=0.5``,
    ``update_proj_gap=1000``); their README sets ``total_t`` to the run's steps for language
    models. The statistics are per tensor, as the authors keep them per param.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominators (the moments' and the norm scaling's), >= 0.
      gamma1: :math:`\gamma_1`, decay of the norm's average, in [0, 1), or -1 for ``b1``.
      gamma2: :math:`\gamma_2`, decay of the squared norm's average, in [0, 1).
      gamma3: :math:`\gamma_3`, decay of the largest entry's average (the authors' ``theta``), in
        [0, 1).
      total_t: :math:`T`, the steps of the cosine decay of :math:`\gamma_1` and :math:`\beta_1` (the
        run's length), an integer >= 1, or ``None`` for none.
      eta_min: :math:`\eta`, the cosine's floor, in [0, 1].
      update_proj_gap: steps between moment resets, an integer >= 0 (0: no resets).
      amsgrad: divide by the running maximum of the second moment.
      restart_norm_count: the bias corrections of :math:`M`, :math:`a` and :math:`b` count from each
        reset, as the authors' code does (``False``: from the start).
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment (and its maximum), as ``mu_dtype``.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation``: the chain of :func:`adam_jax.scale_by_stable_spam`
      and the step (after ``optax.scale(-1)`` with ``maximize=True``).

    References:
      Huang, Zhu, Jin, Liu, Wang and Liu, `Stable-SPAM: How to Train in 4-Bit More Stably
      than 16-Bit Adam <https://arxiv.org/abs/2502.17055>`_, 2025; the authors' code,
      https://github.com/TianjinYellow/StableSPAM (``galore_torch/stablespam.py``).

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = jnp.array([1.0, -2.0])
      >>> tx = adam_jax.stable_spam(0.1, weight_decay=0.5)
      >>> updates, _ = tx.update(jnp.array([3.0, -0.5]), tx.init(params), params)
      >>> print(params + updates)  # (1 - 0.1 * 0.5) * params - 0.1 sign(g)
      [ 0.85 -1.8 ]
    """
    return descend(
        learning_rate,
        scale_by_stable_spam(
            b1=b1,
            b2=b2,
            eps=eps,
            gamma1=gamma1,
            gamma2=gamma2,
            gamma3=gamma3,
            total_t=total_t,
            eta_min=eta_min,
            update_proj_gap=update_proj_gap,
            amsgrad=amsgrad,
            restart_norm_count=restart_norm_count,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            weight_decay=weight_decay,
            mask=mask,
        ),
        maximize=maximize,
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="stable_spam",
        alias=stable_spam,
        group="variant",
        summary=(
            "SPAM's resets with spikes clipped to their running maximum and norms rescaled per "
            "tensor"
        ),
        paper=Paper(
            authors="Huang, Zhu, Jin, Liu, Wang and Liu",
            title="Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
            url="https://arxiv.org/abs/2502.17055",
            venue="2025",
        ),
        transformation=scale_by_stable_spam,
        rule=StableSpamRule,
        # The default rate (3e-3): not tuned on the MNIST example.
        companions=("ScaleByStableSpamState",),
    ),
)
