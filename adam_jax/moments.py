"""Moment estimates: the Adam family's scaling of gradients by running moments.

:func:`scale_by_adam`, :func:`scale_by_amsgrad` and :func:`scale_by_adamax` share one per-leaf
body: the gradient in its compute dtype, the first moment and its bias correction (with optional
Nesterov momentum), and the division by a denominator. They differ only in their second-moment
rule, a :class:`_SecondMoment`: which trees it keeps besides the first moment and how it turns
them into the denominator. Their states are optax's own ``ScaleByAdamState`` and
``ScaleByAmsgradState``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adam_jax import _validation
from adam_jax._numerics import abs_sq, compute_dtype, real_dtype
from adam_jax._validation import static_float
from adam_jax.moving_average import StepScalars, moving_average, step_scalars
from adam_jax.storage import MomentStorage, as_storage, real_part_of

ScaleByAdamState = optax.ScaleByAdamState
ScaleByAmsgradState = optax.ScaleByAmsgradState


def _cast(value: Any, dtype: Any) -> Any:
    """Casts a scalar array to ``dtype``; Python floats stay weakly typed (rounded once)."""
    return value if isinstance(value, float | int) else jnp.asarray(value).astype(dtype)


def _divide(eps: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
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


class _SecondMoment(NamedTuple):
    """A second-moment rule.

    Attributes:
      trees: how many trees it keeps in the state after ``count`` and ``mu`` (the remaining
        fields of the state, in order).
      update: ``(g, kept, scalars) -> (denominator, new_kept)`` for one leaf, where ``g`` is the
        gradient in its compute dtype and ``kept`` the loaded trees' leaves.
    """

    trees: int
    update: Callable[[jax.Array, tuple[jax.Array, ...], StepScalars], tuple[jax.Array, tuple]]


def _adam_second_moment(eps: Any, eps_root: Any, amsgrad: bool, bias_correction: bool):
    """``sqrt(v_hat + eps_root) + eps`` with ``v`` the average of ``|g|^2`` (AMSGrad: its running
    maximum, taken before the bias correction as PyTorch does)."""

    def update(g: jax.Array, kept: tuple[jax.Array, ...], d: StepScalars):
        rdtype = real_dtype(g.dtype)
        nu = moving_average(kept[0], abs_sq(g), d.w2)
        new_kept = (nu, jnp.maximum(kept[1], nu)) if amsgrad else (nu,)
        nu_hat = new_kept[-1] / d.c2 if bias_correction else new_kept[-1]
        denominator = jnp.sqrt(nu_hat + _cast(eps_root, rdtype)) + _cast(eps, rdtype)
        return denominator, new_kept

    return _SecondMoment(trees=2 if amsgrad else 1, update=update)


def _infinity_norm(b2: Any, eps: Any) -> _SecondMoment:
    """AdaMax's ``u = max(b2 u, |g| + eps)``, itself the denominator."""

    def update(g: jax.Array, kept: tuple[jax.Array, ...], d: StepScalars):
        del d
        rdtype = real_dtype(g.dtype)
        u = jnp.maximum(jnp.abs(g) + _cast(eps, rdtype), _cast(b2, rdtype) * kept[0])
        return u, (u,)

    return _SecondMoment(trees=1, update=update)


def _map_leaves(fn: Callable[..., tuple], outputs: int, updates: Any, *states: Any) -> tuple:
    """Applies ``fn`` leaf by leaf (state trees may hold a pytree per leaf) and returns one tree per
    output of ``fn``, each shaped like the corresponding input."""
    treedef: Any = jax.tree.structure(updates)  # its methods are untyped in jax's stubs
    results = treedef.flatten_up_to(jax.tree.map(fn, updates, *states))
    return tuple(treedef.unflatten([r[i] for r in results]) for i in range(outputs))


def _moment_estimate(
    state_type: type,
    second_moment: _SecondMoment,
    *,
    b1: Any,
    b2: Any,
    eps: Any,
    mu_storage: MomentStorage,
    nu_storage: MomentStorage,
    nesterov: bool = False,
    bias_correction: bool = True,
) -> optax.GradientTransformation:
    """The transformation shared by the moment estimates; ``second_moment`` makes the
    difference."""
    divide = _divide(eps)

    def init_fn(params: optax.Params) -> Any:
        second = (
            jax.tree.map(lambda p: nu_storage.init(real_part_of(p)), params)
            for _ in range(second_moment.trees)
        )
        mu = jax.tree.map(mu_storage.init, params)
        return state_type(jnp.zeros([], jnp.int32), mu, *second)

    def update_fn(updates: optax.Updates, state: Any, params: optax.Params | None = None):
        del params
        count = optax.safe_increment(state.count)
        scalars = step_scalars(b1, b2, count)

        def leaf(grad: jax.Array, mu_stored: Any, *kept_stored: Any) -> tuple:
            g = grad.astype(compute_dtype(grad.dtype))
            rdtype = real_dtype(g.dtype)
            d = scalars(rdtype)
            mu = moving_average(mu_storage.load(mu_stored).astype(g.dtype), g, d.w1)
            kept = tuple(nu_storage.load(s).astype(rdtype) for s in kept_stored)
            denominator, new_kept = second_moment.update(g, kept, d)
            if nesterov and bias_correction:
                mu_hat = (1 - d.w1) * (mu / d.c1_next) + d.w1 * (g / d.c1)
            elif nesterov:
                mu_hat = (1 - d.w1) * mu + d.w1 * g
            else:
                mu_hat = mu / d.c1 if bias_correction else mu
            return (
                divide(mu_hat, denominator).astype(grad.dtype),
                mu_storage.store(mu, mu_stored),
                *(nu_storage.store(v, s) for v, s in zip(new_kept, kept_stored, strict=True)),
            )

        new_updates, *trees = _map_leaves(leaf, 2 + second_moment.trees, updates, *state[1:])
        return new_updates, state_type(count, *trees)

    return optax.GradientTransformation(init_fn, update_fn)


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
    return _moment_estimate(
        ScaleByAdamState,
        _adam_second_moment(eps, eps_root, amsgrad=False, bias_correction=bias_correction),
        b1=b1,
        b2=b2,
        eps=eps,
        mu_storage=as_storage(mu_dtype),
        nu_storage=as_storage(nu_dtype),
        nesterov=nesterov,
        bias_correction=bias_correction,
    )


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
    return _moment_estimate(
        ScaleByAmsgradState,
        _adam_second_moment(eps, eps_root, amsgrad=True, bias_correction=bias_correction),
        b1=b1,
        b2=b2,
        eps=eps,
        mu_storage=as_storage(mu_dtype),
        nu_storage=as_storage(nu_dtype),
        bias_correction=bias_correction,
    )


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
    return _moment_estimate(
        ScaleByAdamState,
        _infinity_norm(b2, eps),
        b1=b1,
        b2=b2,
        eps=eps,
        mu_storage=as_storage(mu_dtype),
        nu_storage=as_storage(None),
    )
