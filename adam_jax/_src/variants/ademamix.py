r"""AdEMAMix: Adam with a second, much slower momentum mixed into the numerator.

Pagliardini et al. (2024) observe that gradients stay useful for tens of thousands of steps,
far longer than Adam's :math:`\beta_1 = 0.9` remembers, but that a single slow average reacts
too slowly. AdEMAMix keeps both: Adam's fast average :math:`m^{(1)}` and a slow one
:math:`m^{(2)}` with :math:`\beta_3 = 0.9999`, weighted by :math:`\alpha`. Early in training the
slow average is warmed up (:math:`\alpha` linearly, :math:`\beta_3` linearly in its half-life).
The simplified form (Morwani et al., 2025) folds both into one accumulator.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.contrib

from adam_jax import rules
from adam_jax.rules import (
    Leaf,
    Mask,
    Moment,
    MomentRule,
    OptimizerInfo,
    Paper,
    StepScalars,
    abs_sq,
    add_decayed_weights,
    descend,
    moving_average,
    moving_average_terms,
    scale_by_rule,
    second_moment,
    step_scalars,
)

ScaleByAdemamixState = optax.contrib.ScaleByAdemamixState
ScaleBySimplifiedAdEMAMixState = optax.contrib.ScaleBySimplifiedAdEMAMixState
# The authors' half-life of a decay, log(0.5) / log(beta + 1e-8) - 1, has this 1e-8 in it.
_HALF_LIFE_EPS = 1e-8


def _value_at(value: Any, count: jax.Array) -> Any:
    """A hyperparameter that may be a schedule, at the 0-based step ``count``."""
    return value(count) if callable(value) else value


def _half_life(beta: Any) -> Any:
    """The authors' ``f(beta) = log(0.5) / log(beta + 1e-8) - 1``: the steps after which a
    decay ``beta`` has halved, minus one (in double precision for a concrete ``beta``)."""
    number = rules.static_float(beta)
    if number is not None:
        return math.log(0.5) / math.log(number + _HALF_LIFE_EPS) - 1.0
    return jnp.log(0.5) / jnp.log(beta + _HALF_LIFE_EPS) - 1.0


def slow_weight(
    b1: Any, b3: Any, warmup_steps: int | None, count: jax.Array, dtype: Any
) -> jax.Array | float:
    r"""The weight :math:`1 - \beta_3(t)` of the slow average at the 1-based step ``count``.

    Without warm-up it is :math:`1 - \beta_3`. With ``warmup_steps`` :math:`T` it follows the
    authors' ``linear_hl_warmup_scheduler``: for :math:`t < T` the half-life moves linearly from
    :math:`\beta_1`'s to :math:`\beta_3`'s, :math:`h = (1 - t/T) f(\beta_1) + (t/T) f(\beta_3)`,
    and :math:`\beta_3(t) = 0.5^{1/(h + 1)}`. The weight is computed as
    :math:`-\mathrm{expm1}(\log(0.5) / (h + 1))`: :math:`1 - \beta_3(t)` itself would lose four
    of float32's seven digits near 0.9999.
    """
    constant = moving_average_terms(b3, 1, dtype)[0]
    if warmup_steps is None:
        return constant
    t = jnp.asarray(count).astype(dtype)
    fraction = t / warmup_steps
    half_life = (1 - fraction) * _half_life(b1) + fraction * _half_life(b3)
    warming = -jnp.expm1(math.log(0.5) / (half_life + 1))
    return jnp.where(t < warmup_steps, warming, constant)


class AdemamixScalars(NamedTuple):
    """Per-step scalars of AdEMAMix: Adam's, the slow average's weight and :math:`\\alpha`."""

    adam: StepScalars
    w3: Any
    alpha: Any


def _check_warmup(name: str, steps: int | None) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"{name} must be None or an integer >= 1, got {steps!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdemamixRule(MomentRule):
    """AdEMAMix's moment rule: see :func:`scale_by_ademamix`."""

    b1: Any = rules.hyperparam(0.9, "decay of the fast first moment, in [0, 1).", rules.check_decay)
    b2: Any = rules.b2()
    b3: Any = rules.hyperparam(
        0.9999,
        "decay of the slow first moment, in [0, 1), or a schedule of the 0-based step.",
        rules.check_decay,
    )
    alpha: Any = rules.hyperparam(
        6.0,
        "weight of the slow moment, >= 0, or a schedule of the 0-based step.",
        rules.check_non_negative,
    )
    eps: Any = rules.eps()
    eps_root: Any = rules.eps_root()
    mu_dtype: Any = rules.hyperparam(
        None,
        "storage of both first moments (``None``: the params' dtype; a dtype; or a "
        ":class:`adam_jax.MomentStorage`).",
    )
    alpha_warmup_steps: int | None = rules.hyperparam(
        None, "steps of the linear warm-up of ``alpha`` (``None``: none).", _check_warmup
    )
    b3_warmup_steps: int | None = rules.hyperparam(
        None,
        "steps of the half-life warm-up of ``b3`` (``None``: none; a constant ``b3`` only).",
        _check_warmup,
    )
    nu_dtype: Any = rules.nu_dtype()

    state_type = ScaleByAdemamixState

    def __post_init__(self) -> None:
        super().__post_init__()
        if callable(self.b3) and self.b3_warmup_steps is not None:
            raise ValueError("b3_warmup_steps needs a constant b3, got a schedule")

    def moments(self) -> tuple[Moment, ...]:
        return (
            Moment("m1", self.mu_dtype),
            Moment("m2", self.mu_dtype),
            second_moment(self.nu_dtype),
        )

    def init_fields(self, params: Any) -> dict[str, Any]:
        del params
        return {"count": jnp.zeros([], jnp.int32), "count_m2": jnp.zeros([], jnp.int32)}

    def next_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {name: optax.safe_increment(count) for name, count in fields.items()}

    def scalars(self, fields: dict[str, Any], dtype: Any) -> AdemamixScalars:
        t = optax.safe_increment(fields["count"])
        b3 = _value_at(self.b3, fields["count_m2"])
        alpha = _value_at(self.alpha, fields["count_m2"])
        if self.alpha_warmup_steps is not None:
            fraction = t.astype(dtype) / self.alpha_warmup_steps
            alpha = jnp.minimum(fraction, 1.0) * alpha
        w3 = slow_weight(self.b1, b3, self.b3_warmup_steps, t, dtype)
        return AdemamixScalars(step_scalars(self.b1, self.b2, t)(dtype), w3, alpha)

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: AdemamixScalars, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        d = scalars.adam
        m1 = moving_average(moments["m1"], g, d.w1)
        m2 = moving_average(moments["m2"], g, scalars.w3)
        nu = moving_average(moments["nu"], abs_sq(g), d.w2)
        denominator = jnp.sqrt(leaf.settle("nu", nu) / d.c2 + self.eps_root) + self.eps
        return (m1 / d.c1 + scalars.alpha * m2) / denominator, {"m1": m1, "m2": m2, "nu": nu}


def scale_by_ademamix(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    b3: float | jax.Array = 0.9999,
    alpha: float | jax.Array = 6.0,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any = None,
    *,
    alpha_warmup_steps: int | None = None,
    b3_warmup_steps: int | None = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by AdEMAMix's moment estimates (Pagliardini et al., 2024).

    .. math::
        m^{(1)}_t = \beta_1 m^{(1)}_{t-1} + (1-\beta_1) g_t, \qquad
        m^{(2)}_t = \beta_3(t) m^{(2)}_{t-1} + (1-\beta_3(t)) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2, \\
        u_t = \frac{m^{(1)}_t / (1-\beta_1^t) + \alpha(t)\, m^{(2)}_t}
        {\sqrt{v_t / (1-\beta_2^t) + \epsilon_{root}} + \epsilon}.

    The warm-ups are the paper's, evaluated at the 1-based step :math:`t` as the authors'
    PyTorch code does: ``alpha_warmup_steps`` :math:`T_\alpha` gives
    :math:`\alpha(t) = \alpha \min(t/T_\alpha, 1)`, ``b3_warmup_steps`` the half-life warm-up of
    :func:`slow_weight` from :math:`\beta_1` to :math:`\beta_3`. ``b3`` and ``alpha`` may also
    be schedules, evaluated at the 0-based step (``count_m2``) as optax does, one step earlier
    than the authors' PyTorch code.

    A drop-in for ``optax.contrib.scale_by_ademamix`` (same arguments, defaults and state
    ``optax.contrib.ScaleByAdemamixState``), except that ``mu_dtype`` stores the two first
    moments only (optax stores the second moment in it too; here ``nu_dtype`` does).

    Args:
      b1: decay of the fast first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      b3: decay of the slow first moment, in [0, 1), or a schedule of the 0-based step.
      alpha: weight of the slow moment, >= 0, or a schedule of the 0-based step.
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: storage of both first moments (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      alpha_warmup_steps: steps of the linear warm-up of ``alpha`` (``None``: none).
      b3_warmup_steps: steps of the half-life warm-up of ``b3`` (``None``: none; a constant ``b3``
        only).
      nu_dtype: storage of the second moment, as ``mu_dtype``.

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.contrib.ScaleByAdemamixState``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_ademamix(alpha=5.0)
      >>> updates, state = tx.update(jnp.array([2.0, -1.0]), tx.init(jnp.zeros(2)))
      >>> print(jnp.round(updates, 4))  # (1 + 5 * (1 - b3)) * sign(g) at the first step
      [ 1.0005 -1.0005]
    """
    return scale_by_rule(
        AdemamixRule(
            b1=b1,
            b2=b2,
            b3=b3,
            alpha=alpha,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            alpha_warmup_steps=alpha_warmup_steps,
            b3_warmup_steps=b3_warmup_steps,
            nu_dtype=nu_dtype,
        ),
    )


def ademamix(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    b3: float | jax.Array = 0.9999,
    alpha: float | jax.Array = 5.0,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
    *,
    alpha_warmup_steps: int | None = None,
    b3_warmup_steps: int | None = None,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""AdEMAMix: a drop-in for ``optax.contrib.ademamix``, with the paper's warm-ups.

    .. math::
        \theta_t = \theta_{t-1} - \alpha_{lr}(t) \left( \frac{\hat m^{(1)}_t + \alpha(t)\,
        m^{(2)}_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon} + \lambda(t)\,
        \theta_{t-1} \right)

    with the moments of :func:`adam_jax.scale_by_ademamix`: the arithmetic of the authors'
    ``AdEMAMix`` (PyTorch), with the decoupled weight decay scaled by the learning rate as
    theirs. Their defaults are :math:`\alpha = 2` and no warm-up (the paper uses
    :math:`\alpha` from 5 to 8 with warm-ups as long as training); the defaults here are
    optax's.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the fast first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      b3: decay of the slow first moment, in [0, 1), or a schedule of the 0-based step.
      alpha: weight of the slow moment, >= 0, or a schedule of the 0-based step.
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: storage of both first moments (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      alpha_warmup_steps: steps of the linear warm-up of ``alpha`` (``None``: none).
      b3_warmup_steps: steps of the half-life warm-up of ``b3`` (``None``: none; a constant ``b3``
        only).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation``: a chain of the moment estimate,
      :func:`adam_jax.add_decayed_weights` and the learning rate, as optax's.

    References:
      Pagliardini, Ablin and Grangier, `The AdEMAMix Optimizer: Better, Faster, Older
      <https://arxiv.org/abs/2409.03137>`_, ICLR 2025; the authors' code,
      https://github.com/apple/ml-ademamix.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.ademamix(0.1, b3=0.99)
      >>> state = tx.init(jnp.zeros(2))
      >>> for _ in range(3):
      ...     updates, state = tx.update(jnp.array([1.0, -1.0]), state)
      >>> print(jnp.round(updates, 4))  # -0.1 * (1 + alpha * m2), m2 = 1 - 0.99**3 = 0.0297
      [-0.1149  0.1149]
    """
    return descend(
        learning_rate,
        scale_by_ademamix(
            b1=b1,
            b2=b2,
            b3=b3,
            alpha=alpha,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            alpha_warmup_steps=alpha_warmup_steps,
            b3_warmup_steps=b3_warmup_steps,
            nu_dtype=nu_dtype,
        ),
        add_decayed_weights(weight_decay=weight_decay, mask=mask),
        maximize=maximize,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimplifiedAdemamixRule(MomentRule):
    """Simplified AdEMAMix's moment rule: see :func:`scale_by_simplified_ademamix`."""

    b1: Any = rules.hyperparam(0.99, "decay of the accumulator, in [0, 1).", rules.check_decay)
    b2: Any = rules.b2(0.95)
    alpha: Any = rules.hyperparam(
        0.0,
        "weight of the current gradient, >= 0, or a schedule of the 0-based step.",
        rules.check_non_negative,
    )
    eps: Any = rules.eps()
    eps_root: Any = rules.eps_root()
    mu_dtype: Any = rules.hyperparam(
        None,
        "storage of the accumulator (``None``: the params' dtype; a dtype; or a "
        ":class:`adam_jax.MomentStorage`).",
    )
    nu_dtype: Any = rules.nu_dtype()

    state_type = ScaleBySimplifiedAdEMAMixState

    def moments(self) -> tuple[Moment, ...]:
        return (Moment("m", self.mu_dtype), second_moment(self.nu_dtype, "n"))

    def init_fields(self, params: Any) -> dict[str, Any]:
        del params
        return {"t": jnp.zeros([], jnp.int32)}

    def next_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {"t": optax.safe_increment(fields["t"])}

    def step_index(self, fields: dict[str, Any]) -> Any:
        return fields["t"]

    def scalars(self, fields: dict[str, Any], dtype: Any) -> tuple[Any, Any, Any, jax.Array]:
        w1 = moving_average_terms(self.b1, 1, dtype)[0]
        w2, c2 = moving_average_terms(self.b2, optax.safe_increment(fields["t"]), dtype)
        return _value_at(self.alpha, fields["t"]), w1, w2, c2

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: Any, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        alpha, w1, w2, c2 = scalars
        # m + (g - (1 - b1) m) with 1 - b1 rounded once: b1 m would round b1 (0.99 is off by
        # 1e-8 in float32), an error that the accumulator's 1 / (1 - b1) terms amplify.
        m = moments["m"] + (g - w1 * moments["m"])
        n = moving_average(moments["n"], abs_sq(g), w2)
        numerator = m + alpha * g
        denominator = jnp.sqrt(leaf.settle("n", n) / c2 + self.eps_root) + self.eps
        return numerator / denominator, {"m": m, "n": n}


def scale_by_simplified_ademamix(
    b1: float | jax.Array = 0.99,
    b2: float | jax.Array = 0.95,
    alpha: float | jax.Array = 0.0,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by Simplified AdEMAMix's moment estimates (Morwani et al., 2025).

    .. math::
        m_t = \beta_1 m_{t-1} + g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2, \qquad
        u_t = \frac{m_t + \alpha\, g_t}{\sqrt{v_t / (1-\beta_2^t) + \epsilon_{root}}
        + \epsilon}.

    :math:`m_t` is an accumulator (a sum with weights :math:`\beta_1^k`), not an average: with
    :math:`\alpha = 0` this is Adam with :math:`\beta_1` and a learning rate scaled by
    :math:`1/(1-\beta_1)`. A drop-in for ``optax.contrib.scale_by_simplified_ademamix`` (same
    arguments, defaults and state).

    Args:
      b1: decay of the accumulator, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      alpha: weight of the current gradient, >= 0, or a schedule of the 0-based step.
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: storage of the accumulator (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.

    Returns:
      An ``optax.GradientTransformation`` with state
      ``optax.contrib.ScaleBySimplifiedAdEMAMixState``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_simplified_ademamix(alpha=2.0)
      >>> updates, state = tx.update(jnp.array([2.0, -1.0]), tx.init(jnp.zeros(2)))
      >>> print(jnp.round(updates, 4))  # (1 + alpha) * sign(g) at the first step
      [ 3. -3.]
    """
    return scale_by_rule(
        SimplifiedAdemamixRule(
            b1=b1,
            b2=b2,
            alpha=alpha,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
    )


def simplified_ademamix(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.99,
    b2: float | jax.Array = 0.95,
    alpha: float | jax.Array = 0.0,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""Simplified AdEMAMix: a drop-in for ``optax.contrib.simplified_ademamix``.

    .. math::
        \theta_t = \theta_{t-1} - \eta(t) \left( \frac{m_t + \alpha\, g_t}{\sqrt{\hat v_t
        + \epsilon_{root}} + \epsilon} + \lambda(t)\, \theta_{t-1} \right)

    with :math:`m_t = \beta_1 m_{t-1} + g_t` from :func:`adam_jax.scale_by_simplified_ademamix`,
    and the decoupled weight decay scaled by the learning rate as in :func:`adam_jax.adamw`.
    The authors' ``beta1_warmup`` and ``bias_correction1=True`` are not offered.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the accumulator, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      alpha: weight of the current gradient, >= 0, or a schedule of the 0-based step.
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: storage of the accumulator (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation``: a chain of the moment estimate,
      :func:`adam_jax.add_decayed_weights` and the learning rate, as optax's.

    References:
      Morwani, Shapira, Vyas, Malach, Kakade and Janson, `Connections between Schedule-Free
      Optimizers, AdEMAMix, and Accelerated SGD Variants <https://arxiv.org/abs/2502.02431>`_,
      2025; the authors' code, https://github.com/DepenM/Simplified-AdEMAMix.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.simplified_ademamix(0.01, b1=0.9)
      >>> state = tx.init(jnp.zeros(1))
      >>> for _ in range(3):
      ...     updates, state = tx.update(jnp.array([1.0]), state)
      >>> print(jnp.round(updates, 4))  # -0.01 * (1 + 0.9 + 0.81): a sum, not an average
      [-0.0271]
    """
    return descend(
        learning_rate,
        scale_by_simplified_ademamix(
            b1=b1,
            b2=b2,
            alpha=alpha,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        add_decayed_weights(weight_decay=weight_decay, mask=mask),
        maximize=maximize,
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="ademamix",
        alias=ademamix,
        group="variant",
        summary="a second, slow momentum added to Adam's",
        paper=Paper(
            authors="Pagliardini, Ablin and Grangier",
            title="The AdEMAMix Optimizer: Better, Faster, Older",
            url="https://arxiv.org/abs/2409.03137",
            venue="ICLR 2025",
        ),
        transformation=scale_by_ademamix,
        rule=AdemamixRule,
        optax_name="optax.contrib.ademamix",
        # A run of a few thousand steps: the paper's b3 for short runs (its appendix C.1.5).
        example_options={"b3": 0.999},
    ),
    OptimizerInfo(
        name="simplified_ademamix",
        alias=simplified_ademamix,
        group="variant",
        summary="one momentum accumulator plus alpha times the gradient",
        paper=Paper(
            authors="Morwani, Shapira, Vyas, Malach, Kakade and Janson",
            title=(
                "Connections between Schedule-Free Optimizers, AdEMAMix, and Accelerated SGD "
                "Variants"
            ),
            url="https://arxiv.org/abs/2502.02431",
            venue="2025",
        ),
        transformation=scale_by_simplified_ademamix,
        rule=SimplifiedAdemamixRule,
        optax_name="optax.contrib.simplified_ademamix",
        # An accumulator, not an average: b1 = 0.9 sums ~10 gradients (the lr is ~1/10 of
        # Adam's).
        learning_rate=0.0003,
        example_options={"b1": 0.9},
    ),
)
