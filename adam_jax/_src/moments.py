"""Moment estimates: Adam's, AMSGrad's and AdaMax's scaling of gradients by running moments.

Each is a :class:`adam_jax.rules.MomentRule` (:class:`AdamRule`, :class:`AdamaxRule`) turned into a
transformation by :func:`adam_jax.rules.scale_by_rule`; their states are optax's own
``ScaleByAdamState`` and ``ScaleByAmsgradState``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adam_jax._src import hyperparams, validation
from adam_jax._src.bias_correction import scale_by_bias_correction
from adam_jax._src.moving_average import StepScalars, moving_average, step_scalars
from adam_jax._src.numerics import abs_sq, cast_scalar, divide, real_dtype
from adam_jax._src.quantization import fused
from adam_jax._src.rule import Leaf, Moment, MomentRule, scale_by_rule, second_moment
from adam_jax._src.storage import MomentStorage

ScaleByAdamState = optax.ScaleByAdamState
ScaleByAmsgradState = optax.ScaleByAmsgradState


class AdamLikeRule(MomentRule):
    """A rule with Adam's state, moments and step scalars, which most variants keep.

    Subclass it as a frozen dataclass whose fields include ``b1``, ``b2``, ``mu_dtype`` and
    ``nu_dtype``, write :meth:`update`, and override only what differs:

    * ``state_type``: ``optax.ScaleByAdamState`` (``count``, ``mu``, ``nu``), or another type of
      the same fields (AdaBelief keeps optax's ``ScaleByBeliefState``);
    * :meth:`moments`: ``mu`` stored by ``mu_dtype`` and the real second moment ``nu`` by
      ``nu_dtype`` (:func:`adam_jax.rules.second_moment`);
    * :meth:`scalars`: Adam's :class:`adam_jax.rules.StepScalars` of ``b1`` and ``b2`` at the
      1-based step ``count + 1``.
    """

    b1: Any
    b2: Any
    mu_dtype: Any
    nu_dtype: Any
    state_type: Any = ScaleByAdamState

    def moments(self) -> tuple[Moment, ...]:
        return (Moment("mu", self.mu_dtype), second_moment(self.nu_dtype))

    def scalars(self, fields: dict[str, Any], dtype: Any) -> Any:
        return step_scalars(self.b1, self.b2, optax.safe_increment(fields["count"]))(dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamRule(AdamLikeRule):
    """Adam's moment rule (AMSGrad's with ``amsgrad=True``): see :func:`scale_by_adam`."""

    b1: Any = hyperparams.b1()
    b2: Any = hyperparams.b2()
    eps: Any = hyperparams.eps()
    eps_root: Any = hyperparams.eps_root()
    mu_dtype: Any = hyperparams.mu_dtype()
    nu_dtype: Any = hyperparams.nu_dtype()
    # Which transformation builds the rule (scale_by_amsgrad), not a hyperparameter of one.
    amsgrad: bool = False
    nesterov: bool = hyperparams.nesterov()
    bias_correction: bool = hyperparams.hyperparam(
        True, r"divide the moments by :math:`1-\beta^t`."
    )

    @property
    def state_type(self) -> type:
        return ScaleByAmsgradState if self.amsgrad else ScaleByAdamState

    def moments(self) -> tuple[Moment, ...]:
        maximum = (second_moment(self.nu_dtype, "nu_max"),) if self.amsgrad else ()
        return (*super().moments(), *maximum)

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: StepScalars, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        d = scalars
        rdtype = real_dtype(g.dtype)
        mu = moving_average(moments["mu"], g, d.w1)
        nu = moving_average(moments["nu"], abs_sq(g), d.w2)
        new = {"mu": mu, "nu": nu}
        nu = leaf.settle("nu", nu)
        if self.amsgrad:
            new["nu_max"] = nu = leaf.settle("nu_max", jnp.maximum(moments["nu_max"], nu))
        nu_hat = nu / d.c2 if self.bias_correction else nu
        denominator = jnp.sqrt(nu_hat + cast_scalar(self.eps_root, rdtype)) + cast_scalar(
            self.eps, rdtype
        )
        return divide(self.eps)(nesterov_mu_hat(mu, g, d, self), denominator), new

    def step_leaf(
        self,
        arithmetic: Callable[[list[Any]], tuple[jax.Array, list[Any]]],
        stored: list[Any],
        storages: list[MomentStorage],
        grad: jax.Array,
        scalars_for: Callable[[Any], Any],
    ) -> tuple[jax.Array, list[Any]]:
        """A leaf whose two moments ask for the fused 8-bit kernel
        (``BlockwiseQuantized(kernel=...)``) is stepped by it where it can run; every other
        leaf by the core's ``arithmetic``."""

        def update(g: jax.Array, moments: dict[str, jax.Array], scalars: Any) -> Any:
            return self.update(g, moments, scalars, Leaf(param=None, decay=0.0))

        return fused.leaf_step(
            arithmetic, update, self._why_no_kernel(), storages, scalars_for, stored, grad
        )

    def _why_no_kernel(self) -> str:
        """Why the fused kernel cannot run this rule's arithmetic, or ``""``."""
        if type(self) is not AdamRule or self.amsgrad:
            return f"the rule is {type(self).__name__}, not Adam's (without AMSGrad)"
        if not (fused.static_number(self.eps) and fused.static_number(self.eps_root)):
            return "eps and eps_root are not Python numbers"
        return ""


def nesterov_mu_hat(mu: jax.Array, g: jax.Array, d: StepScalars, rule: Any) -> jax.Array:
    """The first moment as the update uses it: bias-corrected (``rule.bias_correction``), with
    Nesterov momentum (``rule.nesterov``) as optax's NAdam."""
    if rule.nesterov and rule.bias_correction:
        return (1 - d.w1) * (mu / d.c1_next) + d.w1 * (g / d.c1)
    if rule.nesterov:
        return (1 - d.w1) * mu + d.w1 * g
    return mu / d.c1 if rule.bias_correction else mu


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamaxRule(AdamLikeRule):
    """AdaMax's moment rule: see :func:`scale_by_adamax`."""

    b1: Any = hyperparams.b1()
    b2: Any = hyperparams.hyperparam(
        0.999, "decay of the infinity norm, in [0, 1).", validation.check_decay
    )
    eps: Any = hyperparams.hyperparam(
        1e-8, "added to :math:`|g_t|`, >= 0.", validation.check_non_negative
    )
    mu_dtype: Any = hyperparams.mu_dtype()
    # The infinity norm is stored as the params (optax's scale_by_adamax has no option).
    nu_dtype: Any = None

    def update(
        self, g: jax.Array, moments: dict[str, jax.Array], scalars: StepScalars, leaf: Leaf
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        rdtype = real_dtype(g.dtype)
        mu = moving_average(moments["mu"], g, scalars.w1)
        u = jnp.maximum(
            jnp.abs(g) + cast_scalar(self.eps, rdtype), cast_scalar(self.b2, rdtype) * moments["nu"]
        )
        return divide(self.eps)(mu / scalars.c1, leaf.settle("nu", u)), {"mu": mu, "nu": u}


def scale_by_adam(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
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
    that weight without cancellation (:func:`adam_jax.rules.moving_average_terms`), which brings
    float32 updates closer to float64 than optax's and PyTorch's. A second moment is stored as a
    real array for complex params. Moments can be stored in another dtype or in a compressed
    :class:`adam_jax.MomentStorage`.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      nesterov: Nesterov momentum (as NAdam).
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
    return scale_by_rule(
        AdamRule(
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            nesterov=nesterov,
            bias_correction=bias_correction,
            amsgrad=False,
        ),
    )


def scale_by_amsgrad(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
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
    is ``optax.ScaleByAmsgradState``; ``nu_dtype`` stores the running maximum too.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
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
    return scale_by_rule(
        AdamRule(
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            bias_correction=bias_correction,
            amsgrad=True,
            nesterov=False,
        ),
    )


def scale_by_adamax(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
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
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAdamState``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_adamax()
      >>> updates, state = tx.update(jnp.array([3.0, -0.5]), tx.init(jnp.zeros(2)))
      >>> print(jnp.round(updates, 6), state.nu)
      [ 1. -1.] [3.  0.5]
    """
    return scale_by_rule(
        AdamaxRule(
            b1=b1,
            b2=b2,
            eps=eps,
            mu_dtype=mu_dtype,
        ),
    )


EPS_PLACEMENTS = ("standard", "keras")


def adam_moments(
    b1: float | jax.Array,
    b2: float | jax.Array,
    eps: float | jax.Array,
    eps_root: float | jax.Array,
    mu_dtype: Any,
    nu_dtype: Any,
    nesterov: bool = False,
    eps_placement: str = "standard",
    *,
    amsgrad: bool = False,
) -> tuple[optax.GradientTransformation, ...]:
    """Adam's moment estimate as the links of a chain, with ``eps`` where ``eps_placement``
    puts it: :func:`adam_jax.scale_by_adam` (``"standard"``); Adam's direction without bias
    corrections, then :func:`adam_jax.scale_by_bias_correction` (``"keras"``, Keras' "epsilon
    hat"); or :func:`adam_jax.scale_by_amsgrad` (``amsgrad=True``). The Adam optimizers
    (:func:`adam_jax.adam`, :func:`adam_jax.adamw`, :func:`adam_jax.adam_l2`,
    :func:`adam_jax.amsgrad`, :func:`adam_jax.cautious_adamw`) chain these links with the
    decay and the learning rate (:func:`descend`); the rule is built here, so that they reach
    :func:`scale_by_rule` in one call.

    Raises:
      ValueError: for an ``eps_placement`` other than the two, ``nesterov=True`` with
        ``"keras"``, and ``amsgrad=True`` with either.

    Example:
      >>> import adam_jax, jax, jax.numpy as jnp
      >>> from adam_jax import rules
      >>> links = rules.adam_moments(0.9, 0.999, 1e-8, 0.0, None, None, eps_placement="keras")
      >>> tx = rules.descend(0.1, *links, adam_jax.add_decayed_weights(1e-4))
      >>> same = jax.tree.structure(adam_jax.adamw(0.1, eps_placement="keras").init(jnp.zeros(3)))
      >>> print(len(links), jax.tree.structure(tx.init(jnp.zeros(3))) == same)
      2 True
    """
    validation.check_choice("eps_placement", eps_placement, EPS_PLACEMENTS)
    if amsgrad and (nesterov or eps_placement != "standard"):
        raise ValueError("amsgrad=True needs nesterov=False and eps_placement='standard'")
    if nesterov and eps_placement == "keras":
        raise ValueError("nesterov=True needs eps_placement='standard', got eps_placement='keras'")
    keras = eps_placement == "keras"
    rule = AdamRule(
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        nesterov=nesterov,
        bias_correction=not keras,
        amsgrad=amsgrad,
    )
    if keras:
        return scale_by_rule(rule), scale_by_bias_correction(b1, b2)
    return (scale_by_rule(rule),)
