"""Moment estimates: Adam's, AMSGrad's and AdaMax's scaling of gradients by running moments.

Each is a :class:`adam_jax.MomentRule` (:class:`AdamRule`, :class:`AdamaxRule`) turned into a
transformation by :func:`adam_jax.scale_by_rule`; their states are optax's own
``ScaleByAdamState`` and ``ScaleByAmsgradState``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adam_jax import _validation
from adam_jax._numerics import abs_sq, real_dtype
from adam_jax._validation import static_float
from adam_jax.moving_average import StepScalars, moving_average, step_scalars
from adam_jax.rule import Leaf, Moment, MomentRule, scale_by_rule
from adam_jax.storage import as_storage

ScaleByAdamState = optax.ScaleByAdamState
ScaleByAmsgradState = optax.ScaleByAmsgradState


def cast_scalar(value: Any, dtype: Any) -> Any:
    """Casts a scalar array to ``dtype``; Python floats stay weakly typed (rounded once)."""
    return value if isinstance(value, float | int) else jnp.asarray(value).astype(dtype)


def divide(eps: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Division by a denominator that has ``eps`` added.

    A concrete ``eps > 0`` keeps the denominator positive (the arithmetic runs in at least
    float32, where 1e-8 does not underflow): plain division. Otherwise 0 / 0 is taken as 0: a zero
    denominator then only arises from an all-zero gradient history, where the numerator is 0.
    """
    number = static_float(eps)
    if number is not None and number > 0:
        return jnp.divide

    def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
        return numerator / jnp.where(denominator == 0, jnp.ones_like(denominator), denominator)

    return safe_divide


@dataclasses.dataclass(frozen=True)
class AdamRule(MomentRule):
    """Adam's moment rule (AMSGrad with ``amsgrad=True``): see :func:`scale_by_adam`.

    Attributes:
      b1, b2, eps, eps_root: as in :func:`scale_by_adam`.
      mu_dtype, nu_dtype: storage of the first and second moments (``None``, a dtype or a
        :class:`adam_jax.MomentStorage`).
      amsgrad: keep the running maximum of the raw second moment (``ScaleByAmsgradState``).
      nesterov, bias_correction: as in :func:`scale_by_adam`.
    """

    b1: Any = 0.9
    b2: Any = 0.999
    eps: Any = 1e-8
    eps_root: Any = 0.0
    mu_dtype: Any = None
    nu_dtype: Any = None
    amsgrad: bool = False
    nesterov: bool = False
    bias_correction: bool = True

    @property
    def state_type(self) -> type:
        return ScaleByAmsgradState if self.amsgrad else ScaleByAdamState

    def moments(self) -> tuple[Moment, ...]:
        second: tuple[Moment, ...] = (Moment("nu", self.nu_dtype, real=True),)
        if self.amsgrad:
            second += (Moment("nu_max", self.nu_dtype, real=True),)
        return (Moment("mu", self.mu_dtype), *second)

    def scalars(self, fields: dict[str, Any], dtype: Any) -> StepScalars:
        return step_scalars(self.b1, self.b2, optax.safe_increment(fields["count"]))(dtype)

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: StepScalars, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        d = scalars
        rdtype = real_dtype(g.dtype)
        mu = moving_average(moments["mu"], g, d.w1)
        nu = moving_average(moments["nu"], abs_sq(g), d.w2)
        new = {"mu": mu, "nu": nu}
        if self.amsgrad:
            new["nu_max"] = nu = jnp.maximum(moments["nu_max"], nu)
        nu_hat = nu / d.c2 if self.bias_correction else nu
        denominator = jnp.sqrt(nu_hat + cast_scalar(self.eps_root, rdtype)) + cast_scalar(
            self.eps, rdtype
        )
        return divide(self.eps)(nesterov_mu_hat(mu, g, d, self), denominator), new


def nesterov_mu_hat(mu: jax.Array, g: jax.Array, d: StepScalars, rule: Any) -> jax.Array:
    """The first moment as the update uses it: bias-corrected (``rule.bias_correction``), with
    Nesterov momentum (``rule.nesterov``) as optax's NAdam."""
    if rule.nesterov and rule.bias_correction:
        return (1 - d.w1) * (mu / d.c1_next) + d.w1 * (g / d.c1)
    if rule.nesterov:
        return (1 - d.w1) * mu + d.w1 * g
    return mu / d.c1 if rule.bias_correction else mu


@dataclasses.dataclass(frozen=True)
class AdamaxRule(MomentRule):
    """AdaMax's moment rule: see :func:`scale_by_adamax`."""

    b1: Any = 0.9
    b2: Any = 0.999
    eps: Any = 1e-8
    mu_dtype: Any = None

    state_type = ScaleByAdamState

    def moments(self) -> tuple[Moment, ...]:
        return (Moment("mu", self.mu_dtype), Moment("nu", real=True))

    def scalars(self, fields: dict[str, Any], dtype: Any) -> StepScalars:
        return step_scalars(self.b1, self.b2, optax.safe_increment(fields["count"]))(dtype)

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: StepScalars, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        rdtype = real_dtype(g.dtype)
        mu = moving_average(moments["mu"], g, scalars.w1)
        u = jnp.maximum(
            jnp.abs(g) + cast_scalar(self.eps, rdtype), cast_scalar(self.b2, rdtype) * moments["nu"]
        )
        return divide(self.eps)(mu / scalars.c1, u), {"mu": mu, "nu": u}


def _check_moment_args(b1: Any, b2: Any, eps: Any, eps_root: Any = 0.0) -> None:
    _validation.check_decay("b1", b1)
    _validation.check_decay("b2", b2)
    _validation.check_non_negative("eps", eps)
    _validation.check_non_negative("eps_root", eps_root)


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nu_dtype: Any = None,
    nesterov: bool = False,
    bias_correction: bool = True,
) -> optax.GradientTransformation:
    r"""Rescales gradients by Adam's moment estimates (Kingma and Ba, 2015).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2, \\
        \hat m_t = \frac{m_t}{1-\beta_1^t}, \qquad \hat v_t = \frac{v_t}{1-\beta_2^t}, \qquad
        u_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}.

    With ``nesterov=True`` (NAdam as in optax),
    :math:`\hat m_t = \beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1) g_t/(1-\beta_1^t)`. With
    ``bias_correction=False``, :math:`\hat v_t = v_t` and :math:`\hat m_t = m_t` (with Nesterov,
    :math:`\hat m_t = \beta_1 m_t + (1-\beta_1) g_t`); follow it with
    :func:`adam_jax.scale_by_bias_correction` for the Keras "epsilon hat" form.

    A drop-in for ``optax.scale_by_adam``: same arguments, defaults and state
    (``optax.ScaleByAdamState``), with these differences. Arithmetic runs in at least float32 and
    updates come back in the gradients' dtype. Each moment is updated as
    :math:`m + (1-\beta)(g - m)` with one rounded weight, and :math:`1-\beta^t` is computed for
    that weight without cancellation (:func:`adam_jax.moving_average_terms`), which brings float32
    updates closer to float64 than optax's and PyTorch's. A second moment is stored as a real
    array for complex params. Moments can be stored in another dtype or in a compressed
    :class:`adam_jax.MomentStorage`.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0 (keeps meta-gradients finite).
      mu_dtype: storage of the first moment: ``None`` (the params' dtype), a dtype, or a
        :class:`adam_jax.MomentStorage`.
      nu_dtype: storage of the second moment, likewise.
      nesterov: use Nesterov momentum (NAdam).
      bias_correction: divide the moments by :math:`1-\beta^t`.

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAdamState``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_adam()
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(jnp.array([0.5, -0.25]), tx.init(params))
      >>> print(jnp.round(updates, 6))  # the first step is the sign of the gradient
      [ 1. -1.]
      >>> print(state.count, state.mu)
      1 [ 0.05  -0.025]
    """
    _check_moment_args(b1, b2, eps, eps_root)
    return scale_by_rule(
        AdamRule(b1, b2, eps, eps_root, as_storage(mu_dtype), as_storage(nu_dtype),
                 nesterov=nesterov, bias_correction=bias_correction)
    )  # fmt: skip


def scale_by_amsgrad(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nu_dtype: Any = None,
    bias_correction: bool = True,
) -> optax.GradientTransformation:
    r"""Rescales gradients by AMSGrad's moment estimates, with PyTorch's semantics.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2, \qquad
        v^{max}_t = \max(v^{max}_{t-1}, v_t), \\
        u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v^{max}_t / (1-\beta_2^t) + \epsilon_{root}}
              + \epsilon}.

    The maximum is taken over the raw second moment and bias-corrected afterwards, as
    ``torch.optim.Adam(amsgrad=True)`` does (Reddi et al., 2018, with bias correction). optax
    takes the maximum of the bias-corrected moment instead, which drifts from PyTorch. The state
    is ``optax.ScaleByAmsgradState``.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: storage of the first moment (``None``, a dtype or a ``MomentStorage``).
      nu_dtype: storage of the second moment and its running maximum, likewise.
      bias_correction: divide the moments by :math:`1-\beta^t`.

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAmsgradState``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_amsgrad()
      >>> state = tx.init(jnp.zeros(2))
      >>> _, state = tx.update(jnp.array([2.0, 0.0]), state)
      >>> _, state = tx.update(jnp.array([0.0, 0.0]), state)
      >>> print(state.nu_max)  # the running maximum of the raw second moment
      [0.004 0.   ]
    """
    _check_moment_args(b1, b2, eps, eps_root)
    return scale_by_rule(
        AdamRule(b1, b2, eps, eps_root, as_storage(mu_dtype), as_storage(nu_dtype),
                 amsgrad=True, bias_correction=bias_correction)
    )  # fmt: skip


def scale_by_adamax(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by AdaMax's moment estimates (Kingma and Ba, 2015, section 7.1).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        u_t^{\infty} = \max(\beta_2 u_{t-1}^{\infty}, |g_t| + \epsilon), \qquad
        u_t = \frac{m_t}{(1-\beta_1^t)\, u_t^{\infty}}.

    Same arguments, state (``optax.ScaleByAdamState``) and results as ``optax.scale_by_adamax``
    and ``torch.optim.Adamax``.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the infinity norm, in [0, 1).
      eps: added to :math:`|g_t|`, >= 0.
      mu_dtype: storage of the first moment (``None``, a dtype or a ``MomentStorage``).

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAdamState``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_adamax()
      >>> updates, state = tx.update(jnp.array([3.0, -0.5]), tx.init(jnp.zeros(2)))
      >>> print(jnp.round(updates, 6), state.nu)
      [ 1. -1.] [3.  0.5]
    """
    _check_moment_args(b1, b2, eps)
    return scale_by_rule(AdamaxRule(b1, b2, eps, as_storage(mu_dtype)))
