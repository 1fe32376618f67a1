r"""Grams: Adam's step length in the direction of the current gradient's sign.

Cao, Li and Song (2024) keep Adam's moments but take only the magnitude of its update,
:math:`|\hat m_t / (\sqrt{\hat v_t} + \epsilon)|`, and give it the sign of the current
gradient: the momentum scales the step, the gradient directs it. Where the momentum agrees
with the gradient this is Adam's step; where it disagrees, cautious optimizers skip the
coordinate and Grams reverses it.
"""

import dataclasses
from typing import Any

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
    scale_by_rule,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GramsRule(AdamLikeRule):
    """Grams' moment rule: see :func:`scale_by_grams`."""

    b1: Any = rules.b1()
    b2: Any = rules.b2()
    eps: Any = rules.eps(1e-6)
    bias_correction: bool = rules.hyperparam(True, "divide the moments by 1 - b^t.")
    eps_placement: str = rules.hyperparam(
        "keras",
        '``"keras"`` (the authors\': ``eps`` added before the bias corrections) or '
        '``"standard"`` (the paper\'s).',
        rules.choice("keras", "standard"),
    )
    mu_dtype: Any = rules.mu_dtype()
    nu_dtype: Any = rules.nu_dtype()

    def update(
        self,
        g: jax.Array,
        moments: dict[str, jax.Array],
        scalars: StepScalars,
        leaf: Leaf,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        d = scalars
        mu = moving_average(moments["mu"], g, d.w1)
        nu = moving_average(moments["nu"], abs_sq(g), d.w2)
        root = jnp.sqrt(leaf.settle("nu", nu))
        magnitude = jnp.abs(mu)
        if not self.bias_correction:
            magnitude = magnitude / (root + self.eps)
        elif self.eps_placement == "keras":
            magnitude = magnitude / (root + self.eps) * (jnp.sqrt(d.c2) / d.c1)
        else:
            magnitude = (magnitude / d.c1) / (root / jnp.sqrt(d.c2) + self.eps)
        return leaf.add_decay(jnp.sign(g) * magnitude), {"mu": mu, "nu": nu}


def scale_by_grams(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-6,
    *,
    bias_correction: bool = True,
    eps_placement: str = "keras",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by Grams' moment estimates (Cao, Li and Song, 2024, Algorithm 1).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2, \\
        u_t = \operatorname{sign}(g_t)\, \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
        \frac{|m_t|}{\sqrt{v_t} + \epsilon} + \lambda \theta_{t-1}.

    ``eps_placement="keras"`` is the authors' code (``eps`` added to :math:`\sqrt{v_t}` before
    the bias corrections, Adam's "epsilon hat"); ``"standard"`` is the paper's
    :math:`|\hat m_t| / (\sqrt{\hat v_t} + \epsilon)`. With
    ``bias_correction=False`` (the authors' ``correct_bias=False``) neither correction is
    applied. :math:`\operatorname{sign}(0) = 0`; for complex params the sign is
    :math:`g / |g|`.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      bias_correction: divide the moments by 1 - b^t.
      eps_placement: ``"keras"`` (the authors': ``eps`` added before the bias corrections) or
        ``"standard"`` (the paper's).
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
      >>> tx = adam_jax.scale_by_grams()
      >>> state = tx.init(jnp.zeros(2))
      >>> for g in ([1.0, 1.0], [1.0, -0.5]):
      ...     updates, state = tx.update(jnp.array(g), state)
      >>> print(jnp.round(updates, 3))  # Adam's step is [1, 0.266]: here g's sign rules
      [ 1.    -0.266]
    """
    return scale_by_rule(
        GramsRule(
            b1=b1,
            b2=b2,
            eps=eps,
            bias_correction=bias_correction,
            eps_placement=eps_placement,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        weight_decay=weight_decay,
        mask=mask,
    )


def grams(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-6,
    *,
    bias_correction: bool = True,
    eps_placement: str = "keras",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""Grams (Cao, Li and Song, 2024), as the authors' ``Grams``.

    .. math::
        \theta_t = \theta_{t-1} - \alpha(t)\left(\operatorname{sign}(g_t)
        \left|\frac{\hat m_t}{\sqrt{\hat v_t} + \hat\epsilon}\right| + \lambda
        \theta_{t-1}\right)

    with the moments of :func:`adam_jax.scale_by_grams`: Adam's step length in the direction
    of the current gradient. The decay is the authors' (``p -= lr * weight_decay * p`` before
    the step, as AdamW), and so are the defaults (``eps=1e-6``, the epsilon-hat placement).

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      bias_correction: divide the moments by 1 - b^t.
      eps_placement: ``"keras"`` (the authors': ``eps`` added before the bias corrections) or
        ``"standard"`` (the paper's).
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation`` (a chain ending in the learning rate).

    References:
      Cao, Li and Song, `Grams: Gradient Descent with Adaptive Momentum Scaling
      <https://arxiv.org/abs/2412.17107>`_, 2024; the authors' code,
      https://github.com/Gunale0926/Grams.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = jnp.array([1.0, -2.0])
      >>> tx = adam_jax.grams(0.1, weight_decay=0.5)
      >>> updates, _ = tx.update(jnp.array([3.0, 0.0]), tx.init(params), params)
      >>> print(jnp.round(updates, 3))  # no step where the gradient is 0, only the decay
      [-0.15  0.1 ]
    """
    return descend(
        learning_rate,
        scale_by_grams(
            b1=b1,
            b2=b2,
            eps=eps,
            bias_correction=bias_correction,
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
        name="grams",
        alias=grams,
        group="variant",
        summary="Adam's step length with the sign of the current gradient",
        paper=Paper(
            authors="Cao, Li and Song",
            title="Grams: Gradient Descent with Adaptive Momentum Scaling",
            url="https://arxiv.org/abs/2412.17107",
            venue="2024",
        ),
        transformation=scale_by_grams,
        rule=GramsRule,
    ),
)
