r"""Adam-atan2: Adam without epsilon, the division replaced by an arctangent.

Everett et al. (2024) find Adam's :math:`\epsilon` harmful at scale (it must shrink with the
width of the model) and remove it: :math:`\hat m / \sqrt{\hat v}` becomes
:math:`a \arctan2(\hat m, b\sqrt{\hat v})`, which is bounded by :math:`a\pi/2`, equals
:math:`(a/b)\, \hat m/\sqrt{\hat v}` to first order where the ratio is small, and is defined at
:math:`\hat m = \hat v = 0`.
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
    add_decayed_weights,
    descend,
    moving_average,
    scale_by_rule,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamAtan2Rule(AdamLikeRule):
    """Adam-atan2's moment rule: see :func:`scale_by_adam_atan2`."""

    b1: Any = rules.b1()
    b2: Any = rules.b2(0.99)
    a: Any = rules.hyperparam(1.27, "scale of the update, > 0.", rules.check_positive)
    b: Any = rules.hyperparam(
        1.0, "scale of the second moment inside the arctangent, > 0.", rules.check_positive
    )
    mu_dtype: Any = rules.mu_dtype()
    nu_dtype: Any = rules.nu_dtype()

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: StepScalars, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        if jnp.iscomplexobj(g):
            raise ValueError("adam_atan2 is not defined for complex params (atan2 of a complex)")
        d = scalars
        mu = moving_average(moments["mu"], g, d.w1)
        nu = moving_average(moments["nu"], jnp.square(g), d.w2)
        mu_hat = mu / d.c1
        update = self.a * jnp.arctan2(mu_hat, self.b * jnp.sqrt(leaf.settle("nu", nu) / d.c2))
        return update, {"mu": mu, "nu": nu}


def scale_by_adam_atan2(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.99,
    a: float | jax.Array = 1.27,
    b: float | jax.Array = 1.0,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by Adam-atan2's moment estimates (Everett et al., 2024).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \\
        u_t = a \arctan2\!\left(\frac{m_t}{1-\beta_1^t},\;
        b \sqrt{\frac{v_t}{1-\beta_2^t}}\right).

    There is no :math:`\epsilon`: a zero gradient history gives a zero update. The defaults
    are those of ``adam-atan2-pytorch`` (``a = 1.27``, ``b = 1``, :math:`\beta_2 = 0.99`), whose
    arithmetic this is. Complex params are not supported (``ValueError``).

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      a: scale of the update, > 0.
      b: scale of the second moment inside the arctangent, > 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAdamState``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_adam_atan2()
      >>> updates, _ = tx.update(jnp.array([3.0, 0.0, -0.5]), tx.init(jnp.zeros(3)))
      >>> print(updates)  # 1.27 * atan2(g, |g|) = 1.27 * pi / 4 for any g != 0; 0 at g = 0
      [ 0.9974558  0.        -0.9974558]
    """
    return scale_by_rule(
        AdamAtan2Rule(
            b1=b1,
            b2=b2,
            a=a,
            b=b,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
    )


def adam_atan2(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.99,
    a: float | jax.Array = 1.27,
    b: float | jax.Array = 1.0,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""Adam-atan2: Adam with the division by :math:`\sqrt{\hat v} + \epsilon` replaced by
    :math:`a\arctan2(\hat m, b\sqrt{\hat v})`, with decoupled weight decay.

    .. math::
        \theta_t = \theta_{t-1} - \alpha(t) \left( a \arctan2(\hat m_t, b\sqrt{\hat v_t})
        + \lambda(t)\, \theta_{t-1} \right)

    As ``adam_atan2_pytorch.AdamAtan2`` (the paper gives no code), whose weight decay is scaled
    by the learning rate as here.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      a: scale of the update, > 0.
      b: scale of the second moment inside the arctangent, > 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation``: a chain of the moment estimate,
      :func:`adam_jax.add_decayed_weights` and the learning rate, as :func:`adam_jax.adamw`.

    References:
      Everett, Xiao, Wortsman, Alemi, Novak, Liu, Gur, Sohl-Dickstein, Kaelbling, Lee and
      Pennington, `Scaling Exponents Across Parameterizations and Optimizers
      <https://arxiv.org/abs/2407.05872>`_, ICML 2024; the code whose constants this uses,
      https://github.com/lucidrains/adam-atan2-pytorch.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.adam_atan2(0.1)
      >>> updates, _ = tx.update(jnp.array([1e15, 1e-15]), tx.init(jnp.zeros(2)))
      >>> print(updates)  # -0.1 * 1.27 * pi / 4 for both (Adam's eps would stop the second)
      [-0.09974558 -0.09974558]
    """
    return descend(
        learning_rate,
        scale_by_adam_atan2(
            b1=b1,
            b2=b2,
            a=a,
            b=b,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        add_decayed_weights(weight_decay=weight_decay, mask=mask),
        maximize=maximize,
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="adam_atan2",
        alias=adam_atan2,
        group="variant",
        summary="atan2 of the moments in place of the division (no epsilon)",
        paper=Paper(
            authors=(
                "Everett, Xiao, Wortsman, Alemi, Novak, Liu, Gur, Sohl-Dickstein, Kaelbling, Lee "
                "and Pennington"
            ),
            title="Scaling Exponents Across Parameterizations and Optimizers",
            url="https://arxiv.org/abs/2407.05872",
            venue="ICML 2024",
        ),
        transformation=scale_by_adam_atan2,
        rule=AdamAtan2Rule,
    ),
)
