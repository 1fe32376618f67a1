r"""ADOPT: Adam that converges for any :math:`\beta_2`, by normalizing with the previous second
moment.

Taniguchi et al. (2024) trace Adam's non-convergence (Reddi et al., 2018) to the correlation
between :math:`g_t` and :math:`v_t`, which contains :math:`g_t^2`. ADOPT divides the gradient
by :math:`\sqrt{v_{t-1}}` instead, *before* the momentum average, and starts :math:`v` from the
first squared gradient (the first call only initializes it), so that the optimal
:math:`O(1/\sqrt T)` rate holds for any :math:`\beta_2`. The authors' code clips the normalized
gradient at :math:`(t-1)^{1/4}` for stability early in training.
"""

import dataclasses
from collections.abc import Callable
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
    abs_sq,
    descend,
    divide,
    moving_average,
    moving_average_terms,
    scale_by_rule,
)


def quarter_power(count: jax.Array) -> jax.Array:
    r"""The authors' clip value at a step: :math:`c^{1/4}` of the number of earlier calls."""
    return count**0.25


class AdoptScalars(NamedTuple):
    """Per-step scalars of ADOPT: the averages' weights, the clip value, and whether this is
    the first call (which only initializes the second moment)."""

    w1: Any
    w2: Any
    clip: Any
    first: jax.Array


def _clip(x: jax.Array, bound: Any) -> jax.Array:
    """``x`` clipped to ``[-bound, bound]`` (real and imaginary parts apart, as PyTorch clips
    the real view of a complex tensor)."""
    if jnp.iscomplexobj(x):
        return jax.lax.complex(jnp.clip(x.real, -bound, bound), jnp.clip(x.imag, -bound, bound))
    return jnp.clip(x, -bound, bound)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdoptRule(AdamLikeRule):
    """ADOPT's moment rule: see :func:`scale_by_adopt`."""

    b1: Any = rules.b1()
    b2: Any = rules.b2(0.9999)
    eps: Any = rules.hyperparam(
        1e-6, r"floor of :math:`\sqrt{v_{t-1}}`, >= 0.", rules.check_non_negative
    )
    mu_dtype: Any = rules.mu_dtype()
    nesterov: bool = rules.hyperparam(
        False, "Nesterov momentum, as ``optax.contrib.scale_by_adopt``."
    )
    use_clipping: bool = rules.hyperparam(
        True, "clip the normalized gradient at ``clip_value_fn(t)``."
    )
    clip_value_fn: Callable[[jax.Array], Any] | None = rules.hyperparam(
        None,
        "the clip value as a function of the number of earlier calls (a float array of the "
        r"compute dtype); ``None`` is :math:`t^{1/4}`, the authors' ``clip_lambda``. ``None`` "
        "rather than a function, so that ``optax.inject_hyperparams(adopt)`` works without "
        "``static_args`` (it takes every callable argument for a schedule of the step); pass "
        '``static_args="clip_value_fn"`` with a function of your own.',
    )
    nu_dtype: Any = rules.nu_dtype()

    def scalars(self, fields: dict[str, Any], dtype: Any) -> AdoptScalars:
        count = fields["count"]  # earlier calls: 0 on the first
        w1 = moving_average_terms(self.b1, 1, dtype)[0]
        w2 = moving_average_terms(self.b2, 1, dtype)[0]
        clip_value_fn = quarter_power if self.clip_value_fn is None else self.clip_value_fn
        clip = clip_value_fn(count.astype(dtype)) if self.use_clipping else None
        return AdoptScalars(w1, w2, clip, count == 0)

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: AdoptScalars, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        d = scalars
        g_sq = abs_sq(g)
        normalized = divide(self.eps)(g, jnp.maximum(jnp.sqrt(moments["nu"]), self.eps))
        if self.use_clipping:
            normalized = _clip(normalized, d.clip)
        # The first call is selected by the scalars alone (a select between arrays would need
        # them sharded alike, which ZeRO-1's state and the gradients are not): weights of 0 and
        # 1 keep m = 0 and set v = 0 + 1 (g^2 - 0) = g^2, and the update is multiplied by 0.
        mu = moving_average(moments["mu"], normalized, jnp.where(d.first, 0.0, d.w1))
        # The step uses the old nu alone; the new one is settled as the next step will see it.
        nu = leaf.settle("nu", moving_average(moments["nu"], g_sq, jnp.where(d.first, 1.0, d.w2)))
        direction = moving_average(mu, normalized, d.w1) if self.nesterov else mu
        update = leaf.add_decay(direction) * jnp.where(d.first, 0.0, 1.0)
        return update, {"mu": mu, "nu": nu}


def scale_by_adopt(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.9999,
    eps: float | jax.Array = 1e-6,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[jax.Array], Any] | None = None,
    nu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by ADOPT's moment estimates (Taniguchi et al., 2024).

    On the first call :math:`v_0 = |g_0|^2` and the update is zero (no decay either). Then

    .. math::
        \tilde g_t = \mathrm{clip}\!\left(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)},\,
        c(t)\right), \qquad
        m_t = \beta_1 m_{t-1} + (1-\beta_1) \tilde g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2, \\
        u_t = m_t + \lambda \theta_{t-1}

    (with ``nesterov``, :math:`\beta_1 m_t + (1-\beta_1) \tilde g_t` instead of :math:`m_t`), where
    :math:`c(t)` is ``clip_value_fn`` of the number of earlier calls :math:`t`: :math:`t^{1/4}`,
    the authors' ``clip_lambda``. This is the arithmetic of the authors' ``ADOPT`` with
    ``decouple=True``, and a drop-in for ``optax.contrib.scale_by_adopt`` (same arguments,
    defaults and state ``optax.ScaleByAdamState``; optax's default ``clip_value_fn``,
    :math:`t^{1/4}`, is spelled ``None`` here), which has no weight decay. Complex params use
    :math:`v = |g|^2` and clip the real and imaginary parts.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: floor of :math:`\sqrt{v_{t-1}}`, >= 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nesterov: Nesterov momentum, as ``optax.contrib.scale_by_adopt``.
      use_clipping: clip the normalized gradient at ``clip_value_fn(t)``.
      clip_value_fn: the clip value as a function of the number of earlier calls (a float array of
        the compute dtype); ``None`` is :math:`t^{1/4}`, the authors' ``clip_lambda``. ``None``
        rather than a function, so that ``optax.inject_hyperparams(adopt)`` works without
        ``static_args`` (it takes every callable argument for a schedule of the step); pass
        ``static_args="clip_value_fn"`` with a function of your own.
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAdamState``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_adopt()
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.array([2.0, -1.0]), state)
      >>> print(updates, state.nu)  # the first call only sets v to g**2
      [0. 0.] [4. 1.]
      >>> updates, state = tx.update(jnp.array([2.0, -4.0]), state)
      >>> print(updates)  # (1 - b1) * clip(g / sqrt(v), 1)
      [ 0.1 -0.1]
    """
    return scale_by_rule(
        AdoptRule(
            b1=b1,
            b2=b2,
            eps=eps,
            mu_dtype=mu_dtype,
            nesterov=nesterov,
            use_clipping=use_clipping,
            clip_value_fn=clip_value_fn,
            nu_dtype=nu_dtype,
        ),
        weight_decay=weight_decay,
        mask=mask,
    )


def adopt(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.9999,
    eps: float | jax.Array = 1e-6,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[jax.Array], Any] | None = None,
    nu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""ADOPT: a drop-in for ``optax.contrib.adopt``, with the authors' decoupled weight decay.

    .. math::
        \theta_t = \theta_{t-1} - \alpha(t) \left(m_t + \lambda(t)\, \theta_{t-1}\right)

    with :math:`m_t` from :func:`adam_jax.scale_by_adopt` (the first call leaves the params
    unchanged, decay included). The weight decay is scaled by the learning rate, as in
    :func:`adam_jax.adamw` and the authors' ``decouple=True``. Same state as optax's ``adopt``
    whatever the weight decay.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: floor of :math:`\sqrt{v_{t-1}}`, >= 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nesterov: Nesterov momentum, as ``optax.contrib.scale_by_adopt``.
      use_clipping: clip the normalized gradient at ``clip_value_fn(t)``.
      clip_value_fn: the clip value as a function of the number of earlier calls (a float array of
        the compute dtype); ``None`` is :math:`t^{1/4}`, the authors' ``clip_lambda``. ``None``
        rather than a function, so that ``optax.inject_hyperparams(adopt)`` works without
        ``static_args`` (it takes every callable argument for a schedule of the step); pass
        ``static_args="clip_value_fn"`` with a function of your own.
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Taniguchi, Harada, Minegishi, Oshima, Jeong, Nagahara, Iiyama, Suzuki, Iwasawa and
      Matsuo, `ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate
      <https://arxiv.org/abs/2411.02853>`_, NeurIPS 2024; the authors' code,
      https://github.com/iShohei220/adopt.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = jnp.array([1.0, -1.0])
      >>> tx = adam_jax.adopt(0.1, weight_decay=0.5)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([4.0, 4.0]), state, params)
      >>> print(updates)  # the first call only measures v: no step, no decay
      [0. 0.]
      >>> updates, _ = tx.update(jnp.array([2.0, -2.0]), state, params)
      >>> print(jnp.round(updates, 4))  # -0.1 * ((1 - b1) * clip(g / sqrt(v), 1) + 0.5 * params)
      [-0.06  0.06]
    """
    return descend(
        learning_rate,
        scale_by_adopt(
            b1=b1,
            b2=b2,
            eps=eps,
            mu_dtype=mu_dtype,
            nesterov=nesterov,
            use_clipping=use_clipping,
            clip_value_fn=clip_value_fn,
            nu_dtype=nu_dtype,
            weight_decay=weight_decay,
            mask=mask,
        ),
        maximize=maximize,
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="adopt",
        alias=adopt,
        group="variant",
        summary="the second moment of earlier steps normalizes the gradient before momentum",
        paper=Paper(
            authors=(
                "Taniguchi, Harada, Minegishi, Oshima, Jeong, Nagahara, Iiyama, Suzuki, Iwasawa "
                "and Matsuo"
            ),
            title="ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate",
            url="https://arxiv.org/abs/2411.02853",
            venue="NeurIPS 2024",
        ),
        transformation=scale_by_adopt,
        rule=AdoptRule,
        optax_name="optax.contrib.adopt",
    ),
)
