"""The Adam family as ready-made optimizers, each a ``optax.chain`` of adam_jax's pieces.

Every alias negates the gradients first when ``maximize=True`` (PyTorch's ``maximize``: weight
decay still shrinks the weights), then applies the moment estimate, the weight decay where it
has one, and the learning-rate step.
"""

from __future__ import annotations

from typing import Any

import optax

from adam_jax import _validation
from adam_jax.bias_correction import scale_by_bias_correction
from adam_jax.learning_rate import scale_by_learning_rate
from adam_jax.moments import scale_by_adam, scale_by_adamax, scale_by_amsgrad
from adam_jax.weight_decay import Mask, add_decayed_weights

EPS_PLACEMENTS = ("standard", "keras")


def _ascent(maximize: bool) -> tuple[optax.GradientTransformation, ...]:
    return (optax.scale(-1.0),) if maximize else ()


def _adam_moments(
    b1: float,
    b2: float,
    eps: float,
    eps_root: float,
    mu_dtype: Any,
    nu_dtype: Any,
    nesterov: bool,
    eps_placement: str,
) -> tuple[optax.GradientTransformation, ...]:
    """Adam's moment estimate with eps where ``eps_placement`` puts it."""
    _validation.check_choice("eps_placement", eps_placement, EPS_PLACEMENTS)
    if eps_placement == "standard":
        moments = scale_by_adam(
            b1, b2, eps, eps_root, mu_dtype, nu_dtype=nu_dtype, nesterov=nesterov
        )
        return (moments,)
    if nesterov:
        raise ValueError("nesterov=True needs eps_placement='standard', got eps_placement='keras'")
    return (
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nu_dtype=nu_dtype, bias_correction=False),
        scale_by_bias_correction(b1, b2),
    )


def adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
    eps_placement: str = "standard",
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""Adam (Kingma and Ba, 2015): a drop-in for ``optax.adam``.

    .. math::
        \theta_t = \theta_{t-1} - \alpha(t)\, \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}}
        + \epsilon}

    with :math:`\hat m_t, \hat v_t` from :func:`adam_jax.scale_by_adam`. With
    ``eps_placement="keras"`` the step is Keras / TensorFlow's "epsilon hat" form,
    :math:`\alpha(t) \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \frac{m_t}{\sqrt{v_t}+\hat\epsilon}`.

    Args:
      learning_rate: a constant >= 0 or a schedule.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nesterov: Nesterov momentum (NAdam).
      nu_dtype: storage of the second moment, likewise.
      eps_placement: ``"standard"`` (PyTorch, optax) or ``"keras"``.
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import adam_jax, jax, jax.numpy as jnp, optax
      >>> params = {"w": jnp.zeros(3)}
      >>> opt = adam_jax.adam(1e-3)
      >>> state = opt.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum((p["w"] - 1.0) ** 2))(params)
      >>> updates, state = opt.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
    """
    return optax.chain(
        *_ascent(maximize),
        *_adam_moments(b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov, eps_placement),
        scale_by_learning_rate(learning_rate),
    )


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Mask | None = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
    eps_placement: str = "standard",
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""AdamW (Loshchilov and Hutter, 2019): Adam with decoupled weight decay, a drop-in for
    ``optax.adamw`` and ``torch.optim.AdamW``.

    .. math::
        \theta_t = \theta_{t-1} - \alpha(t) \left( \frac{\hat m_t}{\sqrt{\hat v_t +
        \epsilon_{root}} + \epsilon} + \lambda(t)\, \theta_{t-1} \right)

    Args:
      learning_rate: a constant >= 0 or a schedule.
      b1, b2, eps, eps_root, mu_dtype: as in :func:`adam`.
      weight_decay: :math:`\lambda`, a constant >= 0 or a schedule of the step.
      mask: which leaves to decay (pytree of bools or a callable of the params).
      nesterov, nu_dtype, eps_placement, maximize: as in :func:`adam`.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import adam_jax, jax
      >>> opt = adam_jax.adamw(1e-3, weight_decay=0.05,
      ...                      mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    """
    return optax.chain(
        *_ascent(maximize),
        *_adam_moments(b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov, eps_placement),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def adam_l2(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
    *,
    nu_dtype: Any = None,
    amsgrad: bool = False,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""Adam with L2-coupled weight decay, as ``torch.optim.Adam(weight_decay=...)``.

    The decay term enters the gradient before the moments, :math:`g_t \leftarrow g_t + \lambda(t)
    \theta_{t-1}`, and is therefore rescaled by the second moment (unlike :func:`adamw`).

    Args:
      learning_rate: a constant >= 0 or a schedule.
      b1, b2, eps, eps_root, mu_dtype, nu_dtype: as in :func:`adam`.
      weight_decay: :math:`\lambda`, a constant >= 0 or a schedule of the step.
      mask: which leaves to decay (pytree of bools or a callable of the params).
      amsgrad: use :func:`adam_jax.scale_by_amsgrad` (PyTorch's ``amsgrad=True``).
      maximize: ascend instead of descending (the gradient is negated before the decay term is
        added, as in PyTorch).

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import adam_jax
      >>> opt = adam_jax.adam_l2(1e-3, weight_decay=1e-2)
    """
    moments = scale_by_amsgrad if amsgrad else scale_by_adam
    return optax.chain(
        *_ascent(maximize),
        add_decayed_weights(weight_decay, mask),
        moments(b1, b2, eps, eps_root, mu_dtype, nu_dtype=nu_dtype),
        scale_by_learning_rate(learning_rate),
    )


def nadam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""NAdam (Dozat, 2016) in optax's form: :func:`adam` with ``nesterov=True``.

    .. math::
        \hat m_t = \frac{\beta_1 m_t}{1-\beta_1^{t+1}} + \frac{(1-\beta_1) g_t}{1-\beta_1^t}

    Args:
      learning_rate, b1, b2, eps, eps_root, mu_dtype, nu_dtype, maximize: as in :func:`adam`.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import adam_jax
      >>> opt = adam_jax.nadam(2e-3)
    """
    return adam(
        learning_rate, b1, b2, eps, eps_root, mu_dtype,
        nesterov=True, nu_dtype=nu_dtype, maximize=maximize,
    )  # fmt: skip


def nadamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Mask | None = None,
    *,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    """NAdamW: :func:`adamw` with ``nesterov=True`` (optax's ``nadamw``).

    Args:
      learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nu_dtype, maximize: as
        in :func:`adamw`.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import adam_jax
      >>> opt = adam_jax.nadamw(2e-3, weight_decay=1e-2)
    """
    return adamw(
        learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask,
        nesterov=True, nu_dtype=nu_dtype, maximize=maximize,
    )  # fmt: skip


def amsgrad(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""AMSGrad with PyTorch's semantics (``torch.optim.Adam(amsgrad=True)``): the running maximum
    of the raw second moment, bias-corrected afterwards (see :func:`adam_jax.scale_by_amsgrad`).

    Args:
      learning_rate, b1, b2, eps, eps_root, mu_dtype, nu_dtype, maximize: as in :func:`adam`.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import adam_jax
      >>> opt = adam_jax.amsgrad(1e-3)
    """
    return optax.chain(
        *_ascent(maximize),
        scale_by_amsgrad(b1, b2, eps, eps_root, mu_dtype, nu_dtype=nu_dtype),
        scale_by_learning_rate(learning_rate),
    )


def adamax(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""AdaMax (Kingma and Ba, 2015): Adam with the infinity norm, a drop-in for ``optax.adamax``.

    .. math::
        \theta_t = \theta_{t-1} - \alpha(t) \frac{m_t}{(1-\beta_1^t)\, u^\infty_t}

    Args:
      learning_rate: a constant >= 0 or a schedule.
      b1, b2, eps: as in :func:`adam_jax.scale_by_adamax`.
      maximize: ascend instead of descending.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import adam_jax
      >>> opt = adam_jax.adamax(2e-3)
    """
    return optax.chain(
        *_ascent(maximize), scale_by_adamax(b1, b2, eps), scale_by_learning_rate(learning_rate)
    )


def adamaxw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Mask | None = None,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    """AdaMax with decoupled weight decay, a drop-in for ``optax.adamaxw``.

    Args:
      learning_rate, b1, b2, eps, maximize: as in :func:`adamax`.
      weight_decay, mask: as in :func:`adamw`.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import adam_jax
      >>> opt = adam_jax.adamaxw(2e-3, weight_decay=1e-2)
    """
    return optax.chain(
        *_ascent(maximize),
        scale_by_adamax(b1, b2, eps),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
