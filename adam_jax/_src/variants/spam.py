r"""SPAM: spike-aware Adam with momentum reset (Huang et al., 2025).

Gradient spikes (entries hundreds of times their usual size) linger in Adam's moments for
about :math:`1/(1-\beta_2)` steps. SPAM resets both moments to zero every :math:`\Delta T`
steps, warms the step size up again after each reset along a cosine, and clips each entry
whose square exceeds ``threshold`` times its second moment to the root of that bound, with the
entry's sign.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adam_jax._src import validation
from adam_jax._src.chains import ascent
from adam_jax._src.moments import AdamLikeRule
from adam_jax._src.moving_average import StepScalars, moving_average, step_scalars
from adam_jax._src.numerics import abs_sq, real_dtype
from adam_jax._src.rule import Leaf, scale_by_rule
from adam_jax._src.typed_sharding import typed_sharding
from adam_jax._src.weight_decay import Mask

#: The authors' ``CosineDecay(0.99, warmup_steps)``: the rate right after a reset is 1% of
#: the full one.
_DEATH_RATE = 0.99


class SpamScalars(NamedTuple):
    """One step's scalars: Adam's weights and bias corrections (at the step count, which the
    resets leave running), whether the moments restart from zero, whether spikes are clipped,
    the warm-up factor of the step and the learning rate."""

    adam: StepScalars
    reset: jax.Array
    clip: jax.Array
    scale: jax.Array
    lr: jax.Array


def warmup_scale(count: Any, delta_t: Any, warmup_steps: Any, dtype: Any = jnp.float32) -> Any:
    r"""The authors' factor of the step size at the 0-based step ``count``: after the reset of
    step :math:`j \geq 1` (:math:`(j+1) \bmod \Delta T = 0`), :math:`c = k - j` steps later,

    .. math:: s_k = 1 - 0.99\,\frac{1 + \cos(\pi c / (W + 1))}{2} \quad (c < W),

    and 1 otherwise (before the first such reset, or :math:`W` steps after it)."""
    t = count + 1
    since = t % delta_t  # steps since the last reset
    started = (t - since) >= 2  # a reset at a step j >= 1 (the authors' current_step = 0)
    warming = started & (since < warmup_steps)
    angle = jnp.pi * since.astype(dtype) / (jnp.asarray(warmup_steps).astype(dtype) + 1)
    return jnp.where(warming, 1 - _DEATH_RATE * (1 + jnp.cos(angle)) / 2, 1.0).astype(dtype)


@dataclasses.dataclass(frozen=True)
class SpamRule(AdamLikeRule):
    """SPAM's moment rule: see :func:`scale_by_spam` (``learning_rate=None``: the direction)
    and :func:`spam` (a learning rate: the whole step, decay included)."""

    learning_rate: optax.ScalarOrSchedule | None = None
    b1: Any = 0.9
    b2: Any = 0.999
    eps: Any = 1e-6
    threshold: Any = 5000.0
    delta_t: Any = 500
    warmup_steps: Any = 150
    grad_accu_steps: Any = 20
    correct_bias: bool = True
    mu_dtype: Any = None
    nu_dtype: Any = None

    def scalars(self, fields: dict[str, Any], dtype: Any) -> SpamScalars:
        count = fields["count"]
        t = optax.safe_increment(count)
        since = t % self.delta_t
        clip = (jnp.asarray(self.threshold) != 0) & (t >= self.grad_accu_steps)
        clip = clip & (since >= self.grad_accu_steps)
        rate = self.learning_rate
        if rate is None:
            lr = jnp.ones([], dtype)
        else:
            lr = jnp.asarray(rate(count) if callable(rate) else rate).astype(dtype)
        return SpamScalars(
            step_scalars(self.b1, self.b2, t)(dtype),
            since == 0,
            clip,
            warmup_scale(count, self.delta_t, self.warmup_steps, dtype),
            lr,
        )

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: SpamScalars, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        d = scalars.adam
        rdtype = real_dtype(g.dtype)
        # The moments restart from zero at a reset: a select of the scalar 0, which XLA fuses
        # (of zeros_like it copied each moment at every step on CPU: 3x AdamW's step).
        mu = jnp.where(scalars.reset, 0.0, moments["mu"]).astype(moments["mu"].dtype)
        nu = jnp.where(scalars.reset, 0.0, moments["nu"]).astype(moments["nu"].dtype)
        if validation.static_float(self.threshold) != 0.0:
            g = _laid_out_like(g, mu, nu)
            bound = jnp.asarray(self.threshold).astype(rdtype) * nu
            if jnp.issubdtype(g.dtype, jnp.complexfloating):
                square = abs_sq(g)
                spike = scalars.clip & (square > bound)
                # g / |g| sqrt(bound) (|g| > 0 where it spikes).
                shrink = jnp.sqrt(bound / jnp.where(spike, square, 1.0))
                g = jnp.where(spike, g * shrink.astype(g.dtype), g)
            else:
                spike = scalars.clip & (jnp.square(g) > bound)
                g = jnp.where(spike, jnp.copysign(jnp.sqrt(bound), g), g)
        mu = moving_average(mu, g, d.w1)
        nu = moving_average(nu, abs_sq(g), d.w2)
        new = {"mu": mu, "nu": nu}
        size = scalars.scale * (jnp.sqrt(d.c2) / d.c1 if self.correct_bias else 1.0)
        direction = leaf.settle("mu", mu) / (jnp.sqrt(leaf.settle("nu", nu)) + self.eps)
        direction = direction * size.astype(rdtype)
        if self.learning_rate is None:
            return direction, new
        step = scalars.lr * direction
        if validation.static_float(leaf.decay) == 0.0:
            return -step, new
        if leaf.param is None:
            raise ValueError("weight decay needs params: call update(updates, state, params)")
        # The authors' order: the step, then the stepped params shrink by lr * decay.
        return -step - scalars.lr * leaf.decay * (leaf.param - step), new


def _laid_out_like(g: jax.Array, *moments: jax.Array) -> jax.Array:
    """``g`` with the typed sharding of a full moment (ZeRO-1 shards the state, not the
    gradient), so that it selects against the moments."""
    for moment in moments:
        typed = typed_sharding(moment)
        if moment.shape == g.shape and typed is not None:
            return jax.sharding.reshard(g, typed)
    return g


def _check(
    b1: Any, b2: Any, eps: Any, threshold: Any, delta_t: Any, warmup_steps: Any,
    grad_accu_steps: Any,
) -> None:  # fmt: skip
    validation.check_hyperparams(b1=b1, b2=b2, eps=eps)
    validation.check_non_negative("threshold", threshold)
    validation.check_integer("delta_t", delta_t, 1)
    validation.check_integer("warmup_steps", warmup_steps, 0)
    validation.check_integer("grad_accu_steps", grad_accu_steps, 0)


def scale_by_spam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    *,
    threshold: float = 5000.0,
    delta_t: int = 500,
    warmup_steps: int = 150,
    grad_accu_steps: int = 20,
    correct_bias: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by SPAM's moment estimates (Huang et al., 2025, Algorithm 1).

    At the 0-based step :math:`k` (:math:`t = k + 1`), the moments restart from zero where
    :math:`t \bmod \Delta T = 0`; then, where :math:`t \bmod \Delta T \geq A` and
    ``threshold`` :math:`\theta > 0`, each spike is clipped against the second moment kept so
    far (after the reset):

    .. math::
        \tilde g_t = \begin{cases} \mathrm{sign}(g_t) \sqrt{\theta v_{t-1}}
        & g_t^2 > \theta v_{t-1} \\ g_t & \text{otherwise,} \end{cases} \\
        m_t = \beta_1 m_{t-1} + (1-\beta_1) \tilde g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) \tilde g_t^2, \\
        u_t = s_k \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \frac{m_t}{\sqrt{v_t} + \epsilon},

    with :math:`A` = ``grad_accu_steps``. The bias corrections count every step since the
    start (a reset does not restart them: the authors' ``state["step"]``), and :math:`\epsilon`
    is added to :math:`\sqrt{v_t}`, not to the bias-corrected root. :math:`s_k` is the
    authors' cosine warm-up after each reset of a step :math:`j \geq 1`: with
    :math:`c = k - j < W` (``warmup_steps``),
    :math:`s_k = 1 - 0.99 (1 + \cos(\pi c / (W + 1))) / 2` (0.01 at the reset itself), else 1.
    Complex gradients clip to :math:`g/|g|` times the bound.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to :math:`\sqrt{v_t}`, >= 0 (the authors' default 1e-6).
      threshold: :math:`\theta`, the spike bound as a multiple of the second moment, >= 0
        (0: no clipping).
      delta_t: :math:`\Delta T`, steps between momentum resets, an integer >= 1 (the
        authors' ``DeltaT``).
      warmup_steps: :math:`W`, steps of the cosine warm-up after a reset, an integer >= 0
        (the authors' ``warmup_steps``, ``--warmup_epoch`` on their command line).
      grad_accu_steps: :math:`A`, steps after a reset (and after the start) before spikes are
        clipped, an integer >= 0.
      correct_bias: scale by :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`.
      mu_dtype: storage of the first moment (``None``, a dtype or a ``MomentStorage``).
      nu_dtype: storage of the second moment, likewise.

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAdamState``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_spam()
      >>> updates, state = tx.update(jnp.array([3.0, -0.5]), tx.init(jnp.zeros(2)))
      >>> print(jnp.round(updates, 3))  # the first step: about the sign of g
      [ 1. -1.]
    """
    _check(b1, b2, eps, threshold, delta_t, warmup_steps, grad_accu_steps)
    return scale_by_rule(
        SpamRule(None, b1, b2, eps, threshold, delta_t, warmup_steps, grad_accu_steps,
                 correct_bias, mu_dtype, nu_dtype)
    )  # fmt: skip


def spam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    *,
    threshold: float = 5000.0,
    delta_t: int = 500,
    warmup_steps: int = 150,
    grad_accu_steps: int = 20,
    correct_bias: bool = True,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""SPAM (Huang et al., 2025), as the authors' ``SPAM`` optimizer on dense params.

    With :math:`u_t` the direction of :func:`adam_jax.scale_by_spam` and :math:`\gamma_k`,
    :math:`\lambda_k` the learning rate and weight decay of the 0-based step :math:`k`:

    .. math::
        \theta_{k+1} = (1 - \gamma_k \lambda_k)\,(\theta_k - \gamma_k u_t):

    the decay shrinks the stepped params, scaled by the rate but not by the warm-up (the
    authors' order, and pytorch-optimizer's). The defaults are the authors' (``eps=1e-6``,
    ``threshold=5000``, ``delta_t=500``, ``warmup_steps=150``, ``grad_accu_steps=20``).

    Left out: the authors' sparse momentum (param groups with ``density``: random masks of
    the entries that keep moments, redrawn at each reset, as in GaLore's projected groups).
    At ``density=1.0`` (their README) it is this dense rule, except that their decay of such
    a group is lost (it shrinks a copy, ``p.data[mask]``).

    Where pytorch-optimizer 4.1.0's ``SPAM`` differs: its warm-up runs one step ahead,
    :math:`s_k = 1 - 0.99 (1 + \cos(\pi (c + 1) / (W + 1))) / 2` for :math:`c < W` (its
    ``CosineDecay`` sets ``last_epoch = c`` and then steps the scheduler once more, where the
    authors' evaluates it at ``c``), so the step at a reset is
    :math:`1 - 0.99 (1 + \cos(\pi / (W + 1))) / 2` of the full one, not 0.01; the rest
    (clipping, the resets, the running bias corrections, the decay) is the authors'. Its
    ``density`` masks every matrix (all entries at the default 1.0).

    Args:
      learning_rate: :math:`\gamma`, a constant >= 0 or a schedule of the 0-based step.
      b1, b2, eps, threshold, delta_t, warmup_steps, grad_accu_steps, correct_bias: as in
        :func:`adam_jax.scale_by_spam`.
      weight_decay: :math:`\lambda`, decoupled weight decay (a constant >= 0 or a schedule),
        times the learning rate, of the stepped params.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      mu_dtype, nu_dtype: storage of the moments (``None``, a dtype or a ``MomentStorage``).
      maximize: ascend the objective instead of descending (the decay still shrinks).

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAdamState`` (in a chain
      after ``optax.scale(-1)`` with ``maximize=True``); ``update`` needs params with decay.

    References:
      Huang, Zhu, Jin, Liu, Wang and Liu, `SPAM: Spike-Aware Adam with Momentum Reset for
      Stable LLM Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025; the authors' code,
      https://github.com/TianjinYellow/SPAM-Optimizer (``galore_torch/SPAM.py``).

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = jnp.array([1.0, -2.0])
      >>> tx = adam_jax.spam(0.1, weight_decay=0.5)
      >>> updates, _ = tx.update(jnp.array([3.0, -0.5]), tx.init(params), params)
      >>> print(jnp.round(params + updates, 3))  # (1 - 0.1 * 0.5) * (params - 0.1 sign(g))
      [ 0.855 -1.805]
    """
    if not callable(learning_rate):
        validation.check_non_negative("learning_rate", learning_rate)
    _check(b1, b2, eps, threshold, delta_t, warmup_steps, grad_accu_steps)
    rule = SpamRule(learning_rate, b1, b2, eps, threshold, delta_t, warmup_steps,
                    grad_accu_steps, correct_bias, mu_dtype, nu_dtype)  # fmt: skip
    return optax.chain(*ascent(maximize), scale_by_rule(rule, weight_decay=weight_decay, mask=mask))
