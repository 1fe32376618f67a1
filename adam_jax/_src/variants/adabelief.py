r"""AdaBelief: Adam whose step size follows the belief in the current gradient.

Zhuang et al. (2020) replace Adam's second moment, the average of :math:`g_t^2`, by the
average of :math:`(g_t - m_t)^2`, the squared deviation of the gradient from its prediction
:math:`m_t`: where gradients agree with their running mean the denominator is small and the
step large, where they scatter the step shrinks.
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
    nesterov_mu_hat,
    scale_by_rule,
)

ScaleByBeliefState = optax.ScaleByBeliefState


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdabeliefRule(AdamLikeRule):
    """AdaBelief's moment rule: see :func:`scale_by_belief`."""

    b1: Any = rules.b1()
    b2: Any = rules.hyperparam(
        0.999, "decay of the second central moment, in [0, 1).", rules.check_decay
    )
    eps: Any = rules.eps(1e-16)
    eps_root: Any = rules.hyperparam(
        1e-16,
        "added to the second central moment at every step, >= 0.",
        rules.check_non_negative,
    )
    nesterov: bool = rules.nesterov()
    mu_dtype: Any = rules.mu_dtype()
    nu_dtype: Any = rules.hyperparam(None, "storage of the second central moment, as ``mu_dtype``.")

    state_type = ScaleByBeliefState
    bias_correction = True  # read by nesterov_mu_hat

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: StepScalars, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        d = scalars
        mu = moving_average(moments["mu"], g, d.w1)
        nu = moving_average(moments["nu"], abs_sq(g - mu), d.w2) + self.eps_root
        mu_hat = nesterov_mu_hat(mu, g, d, self)
        update = mu_hat / (jnp.sqrt(leaf.settle("nu", nu) / d.c2) + self.eps)
        return leaf.add_decay(update), {"mu": mu, "nu": nu}


def scale_by_belief(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-16,
    eps_root: float | jax.Array = 1e-16,
    *,
    nesterov: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by AdaBelief's moment estimates (Zhuang et al., 2020, Algorithm 2).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        s_t = \beta_2 s_{t-1} + (1-\beta_2) |g_t - m_t|^2 + \epsilon_{root}, \\
        u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{s_t / (1-\beta_2^t)} + \epsilon}
        + \lambda \theta_{t-1}.

    :math:`\epsilon_{root}` is added to the stored :math:`s_t` at every step, as the authors'
    PyTorch code adds ``eps`` to ``exp_avg_var`` in place (their ``eps`` is both
    :math:`\epsilon` and :math:`\epsilon_{root}` here, 1e-16 by default). A drop-in for
    ``optax.scale_by_belief`` (same arguments, defaults and state ``optax.ScaleByBeliefState``),
    whose arithmetic this is; the decoupled decay is the authors' ``weight_decouple=True``.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second central moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added to the second central moment at every step, >= 0.
      nesterov: Nesterov momentum (as NAdam).
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second central moment, as ``mu_dtype``.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByBeliefState``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_belief()
      >>> state = tx.init(jnp.zeros(2))
      >>> for g in ([1.0, 1.0], [1.0, -1.0]):
      ...     updates, state = tx.update(jnp.array(g), state)
      >>> print(jnp.round(updates, 2))  # steady: a step above Adam's 1; flipping: a small one
      [ 1.17 -0.06]
    """
    return scale_by_rule(
        AdabeliefRule(
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            nesterov=nesterov,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        weight_decay=weight_decay,
        mask=mask,
    )


def adabelief(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-16,
    eps_root: float | jax.Array = 1e-16,
    *,
    nesterov: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""AdaBelief: a drop-in for ``optax.adabelief``, with decoupled weight decay.

    .. math::
        \theta_t = \theta_{t-1} - \alpha(t)\, \left(\frac{\hat m_t}{\sqrt{\hat s_t} + \epsilon}
        + \lambda \theta_{t-1}\right)

    with :math:`\hat s_t` the bias-corrected average of :math:`(g_t - m_t)^2` from
    :func:`adam_jax.scale_by_belief`, and the weight decay scaled by the learning rate as in
    :func:`adam_jax.adamw` (the authors' ``weight_decouple=True``). This is the paper's
    Algorithm 2, which the authors' package runs with ``rectify=False`` (its default since
    version 0.2 rectifies as RAdam).

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second central moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added to the second central moment at every step, >= 0.
      nesterov: Nesterov momentum (as NAdam).
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second central moment, as ``mu_dtype``.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation`` with optax's state structure.

    References:
      Zhuang, Tang, Ding, Tatikonda, Dvornek, Papademetris and Duncan, `AdaBelief Optimizer:
      Adapting Stepsizes by the Belief in Observed Gradients
      <https://arxiv.org/abs/2010.07468>`_, NeurIPS 2020; the authors' code,
      https://github.com/juntang-zhuang/Adabelief-Optimizer.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = {"w": jnp.ones(2), "b": jnp.ones(2)}
      >>> tx = adam_jax.adabelief(0.1, weight_decay=0.5, mask={"w": True, "b": False})
      >>> grads = {"w": jnp.ones(2), "b": jnp.ones(2)}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(jnp.round(updates["w"], 4), jnp.round(updates["b"], 4))  # decay on "w" only
      [-0.1611 -0.1611] [-0.1111 -0.1111]
    """
    return descend(
        learning_rate,
        scale_by_belief(
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            nesterov=nesterov,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            weight_decay=weight_decay,
            mask=mask,
        ),
        maximize=maximize,
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="adabelief",
        alias=adabelief,
        group="variant",
        summary="the variance of the gradient around its mean in place of the second moment",
        paper=Paper(
            authors="Zhuang, Tang, Ding, Tatikonda, Dvornek, Papademetris and Duncan",
            title="AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients",
            url="https://arxiv.org/abs/2010.07468",
            venue="NeurIPS 2020",
        ),
        transformation=scale_by_belief,
        rule=AdabeliefRule,
        optax_name="optax.adabelief",
    ),
)
