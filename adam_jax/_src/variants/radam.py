r"""RAdam: Adam with its adaptive step rectified while the second moment is still noisy.

Liu et al. (2020) show that the variance of Adam's adaptive step is unbounded in the first
steps, when :math:`v_t` averages a handful of squared gradients. RAdam takes plain momentum
steps until the approximate length of the moving average
:math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)` (with :math:`\rho_\infty = 2/(1-\beta_2)
- 1`) reaches a threshold, and multiplies the adaptive step by the variance rectifier
:math:`r_t` afterwards.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adam_jax import rules
from adam_jax.rules import (
    AdamLikeRule,
    Leaf,
    Mask,
    OptimizerInfo,
    Paper,
    StepScalars,
    abs_sq,
    descend,
    moving_average,
    nesterov_mu_hat,
    scale_by_rule,
    step_scalars,
)

# Below this, 1 - y / expm1(y) loses digits to cancellation; its Taylor series does not.
_SERIES_BELOW = 0.5


class RectifiedScalars(NamedTuple):
    """Adam's step scalars plus RAdam's: whether to rectify, and the rectifier."""

    adam: StepScalars
    rectify: jax.Array
    rectifier: jax.Array


def _one_minus_bernoulli(y: jax.Array) -> jax.Array:
    """:math:`1 - y/(e^y - 1)` without cancellation (its Taylor series for small ``y``)."""
    s = jnp.minimum(y, _SERIES_BELOW)
    s2 = s * s
    series = s * (0.5 + s * (-1 / 12 + s2 * (1 / 720 + s2 * (-1 / 30240 + s2 / 1209600))))
    direct = 1 - y / jnp.expm1(jnp.where(y < _SERIES_BELOW, 1.0, y))
    return jnp.where(y < _SERIES_BELOW, series, direct)


def _log_excess(w: jax.Array) -> jax.Array:
    """:math:`-\\log(1-w) - w` without cancellation (its series for small ``w``)."""
    s = jnp.minimum(w, 0.05)
    series = s * s * (1 / 2 + s * (1 / 3 + s * (1 / 4 + s * (1 / 5 + s * (1 / 6 + s / 7)))))
    return jnp.where(w < 0.05, series, -jnp.log1p(-w) - w)


def rectifier_terms(b2: Any, count: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    r"""The length :math:`\rho_t` of the second moment's average and the square of RAdam's
    rectifier :math:`r_t^2 = \frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)
    (\rho_\infty-2)\rho_t}` at step ``count`` (1-based), in ``dtype``.

    :math:`\rho_t = \rho_\infty - 2t\beta^t/(1-\beta^t)` subtracts two numbers close to
    :math:`\rho_\infty` (2000 for :math:`\beta = 0.999`) in the early steps where it decides
    whether to rectify, so it is evaluated as :math:`K + \frac{2}{\ell}(1 - \frac{y}{e^y - 1})`
    with :math:`\ell = -\log\beta`, :math:`y = t\ell` and the constant
    :math:`K = \rho_\infty - 2/\ell` (in double precision when ``b2`` is concrete): a few ulps
    from the exact value in float32, where the textbook formula is off by 1e-4.
    """
    t = jnp.asarray(count).astype(dtype)
    number = rules.static_float(b2)
    if number is not None:
        if number == 0.0:  # rho_t = rho_inf = 1: never rectified
            return jnp.ones((), dtype), jnp.zeros((), dtype)
        w = 1.0 - number
        ell = -math.log(number)
        rho_inf = 2.0 / w - 1.0
        constant = rho_inf - 2.0 / ell
        scale = rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0)) if rho_inf > 4.0 else math.inf
        rho = constant + (2.0 / ell) * _one_minus_bernoulli(t * jnp.asarray(ell, dtype))
        return rho, (rho - 4) * (rho - 2) * jnp.asarray(scale, dtype) / rho
    # Traced b2 (optax.inject_hyperparams, vmap): the same arithmetic in `dtype`. A b2 of
    # exactly 1 (0.999 rounded to bfloat16) is the b2 -> 1 limit: rho_t = t, r_t = 0.
    traced = jnp.asarray(b2).astype(dtype)
    saturated = traced == 1
    weight = jnp.where(saturated, 1.0, 1 - traced)
    log_decay = -jnp.log1p(-weight)
    limit = 2 / weight - 1
    rho_t = (
        2 * _log_excess(weight) / (weight * log_decay)
        - 1
        + (2 / log_decay) * _one_minus_bernoulli(t * log_decay)
    )
    rho_t = jnp.where(saturated, t, rho_t)
    rectifier_sq = (rho_t - 4) * (rho_t - 2) * limit / ((limit - 4) * (limit - 2) * rho_t)
    return rho_t, jnp.where(saturated, 0.0, rectifier_sq)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RadamRule(AdamLikeRule):
    """RAdam's moment rule: see :func:`scale_by_radam`."""

    b1: Any = rules.b1()
    b2: Any = rules.b2()
    eps: Any = rules.eps()
    eps_root: Any = rules.eps_root()
    threshold: Any = rules.hyperparam(
        5.0,
        r":math:`\rho_t` from which the adaptive step is taken, >= 4 (the rectifier is defined "
        r"for :math:`\rho_t \geq 4`).",
        rules.at_least(4.0),
    )
    nesterov: bool = rules.nesterov()
    eps_placement: str = rules.hyperparam(
        "standard",
        '``"standard"`` (optax\'s) or ``"torch"`` (``torch.optim.RAdam``\'s: ``eps`` added to '
        r":math:`\sqrt{v_t}` before the bias correction).",
        rules.choice("standard", "torch"),
    )
    mu_dtype: Any = rules.mu_dtype()
    nu_dtype: Any = rules.nu_dtype()

    bias_correction = True  # read by nesterov_mu_hat

    def scalars(self, fields: dict[str, Any], dtype: Any) -> RectifiedScalars:
        count = optax.safe_increment(fields["count"])
        rho, rectifier_sq = rectifier_terms(self.b2, count, dtype)
        rectify = rho >= jnp.asarray(self.threshold).astype(dtype)
        rectifier = jnp.sqrt(jnp.where(rectify, rectifier_sq, 1.0))
        return RectifiedScalars(step_scalars(self.b1, self.b2, count)(dtype), rectify, rectifier)

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: Any, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        d = scalars.adam
        mu = moving_average(moments["mu"], g, d.w1)
        nu = moving_average(moments["nu"], abs_sq(g), d.w2)
        mu_hat = nesterov_mu_hat(mu, g, d, self)
        new = {"mu": mu, "nu": nu}
        nu = leaf.settle("nu", nu)
        if self.eps_placement == "standard":
            adaptive = mu_hat / (jnp.sqrt(nu / d.c2 + self.eps_root) + self.eps)
        else:  # torch.optim.RAdam: eps added to sqrt(v) before the bias correction
            adaptive = mu_hat * jnp.sqrt(d.c2) / (jnp.sqrt(nu + self.eps_root) + self.eps)
        update = jnp.where(scalars.rectify, scalars.rectifier * adaptive, mu_hat)
        return leaf.add_decay(update), new


def scale_by_radam(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    threshold: float | jax.Array = 5.0,
    *,
    nesterov: bool = False,
    eps_placement: str = "standard",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by RAdam's rectified moment estimates (Liu et al., 2020).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2, \\
        \rho_t = \rho_\infty - \frac{2t\beta_2^t}{1-\beta_2^t}, \qquad
        r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)
        \rho_t}}, \\
        u_t = \begin{cases} r_t\, \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)
        & \rho_t \geq \text{threshold} \\ \hat m_t & \text{otherwise} \end{cases}
        \; + \lambda \theta_{t-1}.

    A drop-in for ``optax.scale_by_radam`` (same arguments, defaults and state
    ``optax.ScaleByAdamState``). With ``eps_placement="torch"`` the adaptive step is
    :math:`r_t \hat m_t \sqrt{1-\beta_2^t} / (\sqrt{v_t + \epsilon_{root}} + \epsilon)`.
    :math:`\rho_t` is computed without the cancellation of its textbook form (see
    :func:`rectifier_terms`), so float32 runs decide and rectify as float64 ones do.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      threshold: :math:`\rho_t` from which the adaptive step is taken, >= 4 (the rectifier is
        defined for :math:`\rho_t \geq 4`).
      nesterov: Nesterov momentum (as NAdam).
      eps_placement: ``"standard"`` (optax's) or ``"torch"`` (``torch.optim.RAdam``'s: ``eps`` added
        to :math:`\sqrt{v_t}` before the bias correction).
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAdamState``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_radam()
      >>> updates, state = tx.update(jnp.array([0.5, -0.25]), tx.init(jnp.zeros(2)))
      >>> print(updates)  # rho_1 = 1 < 5: the bias-corrected momentum alone
      [ 0.5  -0.25]
    """
    return scale_by_rule(
        RadamRule(
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            threshold=threshold,
            nesterov=nesterov,
            eps_placement=eps_placement,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        weight_decay=weight_decay,
        mask=mask,
    )


def radam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    threshold: float | jax.Array = 5.0,
    *,
    nesterov: bool = False,
    eps_placement: str = "standard",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""RAdam: a drop-in for ``optax.radam``, with ``torch.optim.RAdam``'s semantics available.

    .. math::
        \theta_t = \theta_{t-1} - \alpha(t)\, \left(u_t + \lambda \theta_{t-1}\right)

    with :math:`u_t` from :func:`adam_jax.scale_by_radam`: the decay is scaled by the learning
    rate, as :func:`adam_jax.adamw`. ``eps_placement="torch"`` with ``weight_decay`` gives
    ``torch.optim.RAdam(decoupled_weight_decay=True)``. The authors' code (its default
    ``degenerated_to_sgd=False``) leaves the params still before the rectification, and adds
    ``eps`` as ``eps_placement="torch"``.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      threshold: :math:`\rho_t` from which the adaptive step is taken, >= 4 (the rectifier is
        defined for :math:`\rho_t \geq 4`).
      nesterov: Nesterov momentum (as NAdam).
      eps_placement: ``"standard"`` (optax's) or ``"torch"`` (``torch.optim.RAdam``'s: ``eps`` added
        to :math:`\sqrt{v_t}` before the bias correction).
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation`` with optax's state structure (the moment estimate's
      state, then the learning rate's).

    References:
      Liu, Jiang, He, Chen, Liu, Gao and Han, `On the Variance of the Adaptive Learning Rate
      and Beyond <https://arxiv.org/abs/1908.03265>`_, ICLR 2020; the authors' code,
      https://github.com/LiyuanLucasLiu/RAdam.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.radam(0.1)
      >>> updates, state = tx.update(jnp.array([0.5, -0.25]), tx.init(jnp.zeros(2)))
      >>> print(jnp.round(updates, 4))  # rho_1 = 1 < 5: momentum, -0.1 * g (Adam: -0.1 sign(g))
      [-0.05   0.025]
    """
    return descend(
        learning_rate,
        scale_by_radam(
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            threshold=threshold,
            nesterov=nesterov,
            eps_placement=eps_placement,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            weight_decay=weight_decay,
            mask=mask,
        ),
        maximize=maximize,
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="radam",
        alias=radam,
        group="variant",
        summary=(
            "momentum steps until the second moment's variance is tractable, then rectified Adam"
        ),
        paper=Paper(
            authors="Liu, Jiang, He, Chen, Liu, Gao and Han",
            title="On the Variance of the Adaptive Learning Rate and Beyond",
            url="https://arxiv.org/abs/1908.03265",
            venue="ICLR 2020",
        ),
        transformation=scale_by_radam,
        rule=RadamRule,
        optax_name="optax.radam",
        # Momentum steps first, then a small rectifier: it needs more (2 epochs on 12,000
        # images: 96.4% at 3e-3, 98.3% at 2e-2).
        learning_rate=0.02,
    ),
)
