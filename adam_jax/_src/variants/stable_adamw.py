r"""StableAdamW: AdamW with per-tensor update clipping (Wortsman et al., 2023, Algorithm 2).

Loss spikes in large-model training follow steps where the second moment underestimates the
current gradient (a rare large gradient after a quiet stretch), so :math:`g/\sqrt{v}` is
large. StableAdamW measures that per tensor, :math:`\mathrm{RMS}_t =
\sqrt{\mathrm{mean}(g_t^2 / \max(v_t, \epsilon^2))}`, and divides the tensor's step (the decay
term included) by :math:`\max(1, \mathrm{RMS}_t)`, as AdaFactor's update clipping does.
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
    abs_sq,
    descend,
    moving_average,
    scale_by_rule,
    step_scalars,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StableAdamwRule(AdamLikeRule):
    """StableAdamW's moment rule: see :func:`scale_by_stable_adam`."""

    b1: Any = rules.b1()
    b2: Any = rules.b2(0.99)
    eps: Any = rules.hyperparam(
        1e-6,
        r"added to the denominator, and its square floors :math:`v_t` in the RMS, >= 0.",
        rules.check_non_negative,
    )
    mu_dtype: Any = rules.mu_dtype()
    nu_dtype: Any = rules.nu_dtype()

    def scalars(self, fields: dict[str, Any], dtype: Any) -> tuple[jax.Array, jax.Array]:
        # The debiased betas' complements: 1 - b_hat = (1 - b) / (1 - b**t).
        d = step_scalars(self.b1, self.b2, optax.safe_increment(fields["count"]))(dtype)
        return d.w1 / d.c1, d.w2 / d.c2

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: Any, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        w1, w2 = scalars
        g_sq = abs_sq(g)
        mu = moving_average(moments["mu"], g, w1)
        nu = moving_average(moments["nu"], g_sq, w2)
        settled = leaf.settle("nu", nu)
        rms = jnp.sqrt(leaf.mean(g_sq / jnp.maximum(settled, jnp.square(self.eps))))
        update = leaf.add_decay(mu / (jnp.sqrt(settled) + self.eps))
        return update / jnp.maximum(1.0, rms), {"mu": mu, "nu": nu}


def scale_by_stable_adam(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.99,
    eps: float | jax.Array = 1e-6,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by StableAdamW's clipped moment estimates (Wortsman et al., 2023).

    .. math::
        \hat\beta_t = \beta \frac{1 - \beta^{t-1}}{1 - \beta^t}, \qquad
        m_t = \hat\beta_{1,t} m_{t-1} + (1-\hat\beta_{1,t}) g_t, \qquad
        v_t = \hat\beta_{2,t} v_{t-1} + (1-\hat\beta_{2,t}) |g_t|^2, \\
        \mathrm{RMS}_t = \sqrt{\mathrm{mean}\big(|g_t|^2 / \max(v_t, \epsilon^2)\big)}, \qquad
        u_t = \frac{1}{\max(1, \mathrm{RMS}_t)}
        \left(\frac{m_t}{\sqrt{v_t} + \epsilon} + \lambda \theta_{t-1}\right).

    The debiased :math:`\hat\beta` make :math:`m_t, v_t` the bias-corrected averages
    themselves (what the state holds), and the mean runs over each tensor (each leaf, also on
    :class:`adam_jax.FlatParams`). The clipping divides the decay term too, as torch-optimi's
    ``StableAdamW`` (whose arithmetic and defaults this is) scales its learning rate.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator, and its square floors :math:`v_t` in the RMS, >= 0.
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
      >>> tx = adam_jax.scale_by_stable_adam()
      >>> state = tx.init(jnp.zeros(4))
      >>> updates, state = tx.update(jnp.full(4, 0.1), state)
      >>> updates, state = tx.update(jnp.array([10.0, 0.1, 0.1, 0.1]), state)
      >>> print(jnp.round(updates, 3).tolist())  # the spike makes RMS 1.117: all steps shrink
      [0.671, 0.895, 0.895, 0.895]
    """
    return scale_by_rule(
        StableAdamwRule(
            b1=b1,
            b2=b2,
            eps=eps,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        weight_decay=weight_decay,
        mask=mask,
    )


def stable_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.99,
    eps: float | jax.Array = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.01,
    mask: Mask | None = None,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""StableAdamW: AdamW whose step, decay included, is divided per tensor by
    :math:`\max(1, \mathrm{RMS}(g_t/\sqrt{v_t}))`.

    .. math::
        \theta_t = \theta_{t-1} - \frac{\alpha(t)}{\max(1, \mathrm{RMS}_t)} \left(
        \frac{m_t}{\sqrt{v_t} + \epsilon} + \lambda(t)\, \theta_{t-1} \right)

    with :math:`m_t, v_t, \mathrm{RMS}_t` from :func:`adam_jax.scale_by_stable_adam`; the
    arithmetic and defaults of ``optimi.StableAdamW`` (torch-optimi, the reference
    implementation: the paper gives no code), whose weight decay is scaled by the learning rate
    as here.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator, and its square floors :math:`v_t` in the RMS, >= 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Wortsman, Dettmers, Zettlemoyer, Morcos, Farhadi and Schmidt, `Stable and low-precision
      training for large-scale vision-language models <https://arxiv.org/abs/2304.13013>`_,
      NeurIPS 2023; the reference implementation, https://github.com/warner-benjamin/optimi.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = jnp.array([2.0, 2.0])
      >>> tx = adam_jax.stable_adamw(0.1, weight_decay=0.5)
      >>> updates, _ = tx.update(jnp.array([1.0, -1.0]), tx.init(params), params)
      >>> print(jnp.round(updates, 4))  # -0.1 * (sign(g) + 0.5 * 2); RMS = 1: no clipping
      [-0.2  0. ]
    """
    return descend(
        learning_rate,
        scale_by_stable_adam(
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            mask=mask,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        maximize=maximize,
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="stable_adamw",
        alias=stable_adamw,
        group="variant",
        summary="AdamW with each tensor's update clipped by its gradient-to-moment RMS",
        paper=Paper(
            authors="Wortsman, Dettmers, Zettlemoyer, Morcos, Farhadi and Schmidt",
            title="Stable and low-precision training for large-scale vision-language models",
            url="https://arxiv.org/abs/2304.13013",
            venue="NeurIPS 2023",
        ),
        transformation=scale_by_stable_adam,
        rule=StableAdamwRule,
    ),
)
