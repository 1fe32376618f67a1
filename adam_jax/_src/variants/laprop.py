r"""LaProp: momentum over RMSProp-normalized gradients (Ziyin, Wang and Ueda, 2020).

Adam averages the gradients and then divides the average by the root of the second moment;
LaProp divides each gradient first and averages the quotients, which decouples the momentum
:math:`\beta_1` from the adaptivity :math:`\beta_2` (any pair in [0, 1) is stable, e.g.
:math:`\beta_2 < \beta_1`). The authors' code also carries the learning rate inside the
momentum, so that a gradient taken under a larger rate keeps a larger weight when the rate
changes: the rule holds the learning rate, as the authors' optimizer does.
"""

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
    OptimizerInfo,
    Paper,
    abs_sq,
    ascent,
    compute_dtype,
    moving_average,
    moving_average_terms,
    real_dtype,
    scale_by_rule,
    second_moment,
)


class ScaleByLapropState(NamedTuple):
    """LaProp's state: the step count, the running average of the learning rate
    (``lr_avg``, the authors' ``exp_avg_lr_1``), the momentum of the normalized gradients
    (``mu``, times the learning rate), the second moment ``nu``, and where the options keep
    them the :math:`\\beta_2`-average of the gradient (``mean``, ``centered=True``) and the
    running maximum of the second moment (``nu_max``, ``amsgrad=True``), else ``None``."""

    count: jax.Array  # type: ignore[assignment]  # a field, as optax's states have
    lr_avg: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    mean: Any
    nu_max: Any


class LapropScalars(NamedTuple):
    """One step's scalars: the averages' weights, the second moment's bias correction, the
    learning rate :math:`\\gamma_t`, the inverse of its running average (0 while that is 0),
    and whether the step is centered and takes the running maximum."""

    w1: Any
    w2: Any
    c2: jax.Array
    lr: jax.Array
    inv_lr_avg: jax.Array
    centered_now: jax.Array
    max_now: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class LapropRule(MomentRule):
    """LaProp's moment rule: see :func:`scale_by_laprop` (``learning_rate=None``: the
    direction) and :func:`laprop` (a learning rate: the whole step, decay included)."""

    learning_rate: optax.ScalarOrSchedule | None = rules.learning_rate()
    b1: Any = rules.hyperparam(0.9, "decay of the momentum, in [0, 1).", rules.check_decay)
    b2: Any = rules.hyperparam(
        0.999,
        r"decay of the second moment (and of :math:`\bar g_t`), in [0, 1).",
        rules.check_decay,
    )
    eps: Any = rules.eps(1e-15)
    centered: bool = rules.hyperparam(
        False,
        r"subtract the square of the gradient's :math:`\beta_2`-average from :math:`v_t`.",
    )
    amsgrad: bool = rules.hyperparam(
        False, "use the running maximum of the (centered) second moment."
    )
    steps_before_using_centered: int = rules.hyperparam(
        10, "steps taken non-centered first, an integer >= 0.", rules.integer(0)
    )
    mu_dtype: Any = rules.hyperparam(
        None,
        r"storage of the momentum and of :math:`\bar g_t` (``None``: the params' dtype; a "
        "dtype; or a :class:`adam_jax.MomentStorage`).",
    )
    nu_dtype: Any = rules.hyperparam(
        None, "storage of the second moment and its running maximum, as ``mu_dtype``."
    )

    state_type = ScaleByLapropState

    def moments(self) -> tuple[Moment, ...]:
        mean = (Moment("mean", self.mu_dtype),) if self.centered else ()
        maximum = (second_moment(self.nu_dtype, "nu_max"),) if self.amsgrad else ()
        return (Moment("mu", self.mu_dtype), second_moment(self.nu_dtype),
                *mean, *maximum)  # fmt: skip

    def init_fields(self, params: Any) -> dict[str, Any]:
        dtypes = [jnp.result_type(p) for p in jax.tree.leaves(params)]
        dtype = real_dtype(compute_dtype(jnp.result_type(jnp.float32, *dtypes)))
        return {"count": jnp.zeros([], jnp.int32), "lr_avg": jnp.zeros([], dtype)}

    def _lr_avg(self, fields: dict[str, Any]) -> jax.Array:
        """The running average of the learning rate after this step, in the state's dtype
        (without a learning rate, :math:`1-\\beta_1^t` itself)."""
        old, count = fields["lr_avg"], fields["count"]
        w1, c1 = moving_average_terms(self.b1, optax.safe_increment(count), old.dtype)
        if self.learning_rate is None:
            return c1
        return moving_average(old, self.rate(fields, old.dtype), w1)

    def next_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {**fields, "count": optax.safe_increment(fields["count"]),
                "lr_avg": self._lr_avg(fields)}  # fmt: skip

    def scalars(self, fields: dict[str, Any], dtype: Any) -> LapropScalars:
        count = fields["count"]
        t = optax.safe_increment(count)
        w1, _ = moving_average_terms(self.b1, t, dtype)
        w2, c2 = moving_average_terms(self.b2, t, dtype)
        lr_avg = self._lr_avg(fields).astype(dtype)
        inv = jnp.where(lr_avg == 0, 0.0, 1 / jnp.where(lr_avg == 0, 1.0, lr_avg)).astype(dtype)
        centered_now = jnp.asarray(self.centered) & (t > self.steps_before_using_centered)
        max_now = jnp.asarray(not self.centered) | centered_now
        return LapropScalars(w1, w2, c2, self.rate(fields, dtype), inv, centered_now, max_now)

    def update(
        self,
        g: jax.Array,
        moments: dict[str, jax.Array],
        scalars: LapropScalars,
        leaf: Leaf,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        d = scalars
        nu = moving_average(moments["nu"], abs_sq(g), d.w2)
        new = {"nu": nu}
        second = leaf.settle("nu", nu)
        if self.centered:
            new["mean"] = moving_average(moments["mean"], g, d.w2)
            spread = second - abs_sq(leaf.settle("mean", new["mean"]))
            # >= 0 in exact arithmetic (Jensen); the clamp only catches rounding.
            second = jnp.where(d.centered_now, jnp.maximum(spread, 0.0), second)
        if self.amsgrad:
            kept = jnp.where(d.max_now, jnp.maximum(moments["nu_max"], second), moments["nu_max"])
            new["nu_max"] = kept
            second = jnp.where(d.max_now, leaf.settle("nu_max", kept), second)
        normalized = g / (jnp.sqrt(second / d.c2) + self.eps)
        new["mu"] = moving_average(moments["mu"], d.lr * normalized, d.w1)
        direction = leaf.settle("mu", new["mu"]) * d.inv_lr_avg
        if self.learning_rate is None:
            return direction, new
        # The authors' order: the step, then the stepped params shrink by (1 - decay).
        return rules.step_with_rate(direction, d.lr, leaf, decay_after_step=True), new

    def to_state(self, fields: dict[str, Any]) -> ScaleByLapropState:
        values: dict[str, Any] = {name: fields.get(name) for name in ScaleByLapropState._fields}
        return ScaleByLapropState(**values)

    def from_state(self, state: Any) -> dict[str, Any]:
        return {name: value for name, value in state._asdict().items() if value is not None}


def scale_by_laprop(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-15,
    *,
    centered: bool = False,
    amsgrad: bool = False,
    steps_before_using_centered: int = 10,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by LaProp's moment estimates (Ziyin, Wang and Ueda, 2020, Algorithm 1).

    .. math::
        v_t = \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2, \qquad
        n_t = \frac{g_t}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}, \\
        m_t = \beta_1 m_{t-1} + (1-\beta_1) n_t, \qquad u_t = \frac{m_t}{1-\beta_1^t}.

    The gradient is normalized *before* the momentum average. With ``centered=True``, after
    ``steps_before_using_centered`` steps :math:`v_t` becomes :math:`v_t - |\bar g_t|^2`, with
    :math:`\bar g_t = \beta_2 \bar g_{t-1} + (1-\beta_2) g_t` (not bias-corrected: the
    authors' code); with ``amsgrad=True``, :math:`v_t` becomes its running maximum (not taken
    during the non-centered steps of ``centered=True``). This is the direction of
    :func:`adam_jax.laprop` under a constant learning rate and no decay; :func:`adam_jax.laprop`
    holds the learning rate, which the authors' code carries inside the momentum.

    Args:
      b1: decay of the momentum, in [0, 1).
      b2: decay of the second moment (and of :math:`\bar g_t`), in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      centered: subtract the square of the gradient's :math:`\beta_2`-average from :math:`v_t`.
      amsgrad: use the running maximum of the (centered) second moment.
      steps_before_using_centered: steps taken non-centered first, an integer >= 0.
      mu_dtype: storage of the momentum and of :math:`\bar g_t` (``None``: the params' dtype; a
        dtype; or a :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment and its running maximum, as ``mu_dtype``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByLapropState`.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_laprop()
      >>> updates, state = tx.update(jnp.array([3.0, -0.5]), tx.init(jnp.zeros(2)))
      >>> print(jnp.round(updates, 6))  # the first step is the sign of the gradient
      [ 1. -1.]
    """
    return scale_by_rule(
        LapropRule(
            b1=b1,
            b2=b2,
            eps=eps,
            centered=centered,
            amsgrad=amsgrad,
            steps_before_using_centered=steps_before_using_centered,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
    )


def laprop(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-15,
    *,
    centered: bool = False,
    amsgrad: bool = False,
    steps_before_using_centered: int = 10,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""LaProp (Ziyin, Wang and Ueda, 2020), as the authors' ``LaProp``.

    With :math:`n_t` the normalized gradient of :func:`adam_jax.scale_by_laprop` and
    :math:`\gamma_t`, :math:`\lambda_t` the learning rate and weight decay of the 0-based
    step :math:`t-1`:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) \gamma_t n_t, \qquad
        a_t = \beta_1 a_{t-1} + (1-\beta_1) \gamma_t, \\
        \theta_t = (1 - \lambda_t) \left(\theta_{t-1} - \gamma_t \frac{m_t}{a_t}\right).

    The learning rate is inside the momentum and :math:`a_t` is its bias correction (the
    authors' ``exp_avg_lr_1``): under a constant rate :math:`m_t / a_t` is the bias-corrected
    momentum of :func:`adam_jax.scale_by_laprop`, under a schedule (a warm-up) the gradients
    keep the weight of the rate they were taken with. The decay is the authors': the stepped
    params shrink by :math:`1 - \lambda_t`, not scaled by the learning rate (decay
    :math:`\lambda` with the rate where the rate is scheduled, as their README advises). The
    defaults are the authors' (``eps=1e-15``).

    Where the authors' code differs: at a zero rate after non-zero ones it moves the params by
    the whole momentum (its guard ``step_size = 1`` when ``lr == 0``, meant for
    :math:`a_t = 0`), where here a zero rate moves nothing.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the momentum, in [0, 1).
      b2: decay of the second moment (and of :math:`\bar g_t`), in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      centered: subtract the square of the gradient's :math:`\beta_2`-average from :math:`v_t`.
      amsgrad: use the running maximum of the (centered) second moment.
      steps_before_using_centered: steps taken non-centered first, an integer >= 0.
      mu_dtype: storage of the momentum and of :math:`\bar g_t` (``None``: the params' dtype; a
        dtype; or a :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment and its running maximum, as ``mu_dtype``.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByLapropState` (in a chain
      after ``optax.scale(-1)`` with ``maximize=True``); ``update`` needs params with decay.

    References:
      Ziyin, Wang and Ueda, `LaProp: Separating Momentum and Adaptivity in Adam
      <https://arxiv.org/abs/2002.04839>`_, 2020; the authors' code,
      https://github.com/Z-T-WANG/LaProp-Optimizer (``laprop.py``).

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = jnp.array([1.0, -2.0])
      >>> tx = adam_jax.laprop(0.1, weight_decay=0.5)
      >>> updates, _ = tx.update(jnp.array([3.0, -0.5]), tx.init(params), params)
      >>> print(params + updates)  # (1 - 0.5) * (params - 0.1 * sign(g))
      [ 0.45 -0.95]
    """
    return optax.chain(
        *ascent(maximize),
        scale_by_rule(
            LapropRule(
                learning_rate=learning_rate,
                b1=b1,
                b2=b2,
                eps=eps,
                centered=centered,
                amsgrad=amsgrad,
                steps_before_using_centered=steps_before_using_centered,
                mu_dtype=mu_dtype,
                nu_dtype=nu_dtype,
            ),
            weight_decay=weight_decay,
            mask=mask,
        ),
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="laprop",
        alias=laprop,
        group="variant",
        summary="the gradient normalized by the second moment before the momentum average",
        paper=Paper(
            authors="Ziyin, Wang and Ueda",
            title="LaProp: Separating Momentum and Adaptivity in Adam",
            url="https://arxiv.org/abs/2002.04839",
            venue="2020",
        ),
        transformation=scale_by_laprop,
        rule=LapropRule,
        companions=("ScaleByLapropState",),
    ),
)
