"""The Adam family as ready-made optimizers, each an ``optax.chain`` of adam_jax's pieces.

Every alias negates the gradients first when ``maximize=True`` (PyTorch's ``maximize``: weight
decay still shrinks the weights), then applies the moment estimate, the weight decay where it
has one, and the learning-rate step. The chains have the same structure and states as optax's
aliases of the same names, so a state can move between the two libraries.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from adam_jax._src import hyperparams
from adam_jax._src.chains import descend
from adam_jax._src.moments import (
    AdamaxRule,
    AdamRule,
    adam_moments,
    scale_by_adam,
    scale_by_adamax,
    scale_by_amsgrad,
)
from adam_jax._src.optimizer_info import OptimizerInfo, Paper
from adam_jax._src.quantization.eight_bit import eight_bit_moments
from adam_jax._src.weight_decay import Mask, add_decayed_weights


def adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
    eps_placement: str = "standard",
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""Adam: a drop-in for ``optax.adam``.

    .. math::
        \theta_t = \theta_{t-1} - \alpha(t)\, \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}}
        + \epsilon}

    with :math:`\hat m_t, \hat v_t` from :func:`adam_jax.scale_by_adam`. With
    ``eps_placement="keras"`` the step is Keras / TensorFlow's "epsilon hat" form,
    :math:`\alpha(t) \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \frac{m_t}{\sqrt{v_t}+\hat\epsilon}`.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nesterov: Nesterov momentum (as NAdam).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      eps_placement: ``"standard"`` (PyTorch, optax) or ``"keras"`` (``eps`` added before the
        bias corrections, Keras' "epsilon hat").
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, ICLR 2015.

    Example:
      >>> import adam_jax, jax, jax.numpy as jnp, optax
      >>> params = {"w": jnp.zeros(3)}
      >>> loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
      >>> tx = adam_jax.adam(0.1)
      >>> state = tx.init(params)
      >>> for _ in range(200):
      ...     updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(jnp.round(params["w"], 2))
      [1. 1. 1.]
    """
    return descend(
        learning_rate,
        *adam_moments(b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov, eps_placement),
        maximize=maximize,
    )


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Mask | None = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any = None,
    eps_placement: str = "standard",
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""AdamW: Adam with decoupled weight decay, a drop-in for ``optax.adamw`` and
    ``torch.optim.AdamW``.

    .. math::
        \theta_t = \theta_{t-1} - \alpha(t) \left( \frac{\hat m_t}{\sqrt{\hat v_t +
        \epsilon_{root}} + \epsilon} + \lambda(t)\, \theta_{t-1} \right)

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      nesterov: Nesterov momentum (as NAdam).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      eps_placement: ``"standard"`` (PyTorch, optax) or ``"keras"`` (``eps`` added before the
        bias corrections, Keras' "epsilon hat").
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Loshchilov and Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.

    Example:
      >>> import adam_jax, jax, jax.numpy as jnp
      >>> params = {"w": jnp.full((2, 2), 2.0), "b": jnp.full(2, 2.0)}
      >>> tx = adam_jax.adamw(0.1, weight_decay=0.5,
      ...                     mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(jnp.round(updates["w"][0], 6), jnp.round(updates["b"], 6))  # -0.1 * (1 + 0.5 * 2)
      [-0.2 -0.2] [-0.1 -0.1]
    """
    return descend(
        learning_rate,
        *adam_moments(b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov, eps_placement),
        add_decayed_weights(weight_decay, mask),
        maximize=maximize,
    )


def adam_l2(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
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
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      weight_decay: L2 weight decay :math:`\lambda`, a constant >= 0 or a schedule of the step,
        added to the gradient.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      amsgrad: use :func:`adam_jax.scale_by_amsgrad` (PyTorch's ``amsgrad=True``).
      maximize: ascend the objective instead of descending (the gradient is negated before
        the decay term is added, as in PyTorch).

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, ICLR 2015; the L2 term as in PyTorch's
      ``torch.optim.Adam``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = jnp.array([4.0, -4.0])
      >>> tx = adam_jax.adam_l2(0.01, weight_decay=1.0)
      >>> updates, _ = tx.update(jnp.zeros(2), tx.init(params), params)
      >>> print(updates)  # the decay term alone gives the gradient's sign
      [-0.01  0.01]
    """
    return descend(
        learning_rate,
        add_decayed_weights(weight_decay, mask),
        *adam_moments(b1, b2, eps, eps_root, mu_dtype, nu_dtype, amsgrad=amsgrad),
        maximize=maximize,
    )


nadam = hyperparams.partial(
    adam,
    r"""NAdam in optax's form: :func:`adam` with ``nesterov=True`` (a partial: it takes the
arguments of :func:`adam`).

.. math::
    \hat m_t = \frac{\beta_1 m_t}{1-\beta_1^{t+1}} + \frac{(1-\beta_1) g_t}{1-\beta_1^t}

Returns:
  An ``optax.GradientTransformation``.

References:
  Dozat, `Incorporating Nesterov Momentum into Adam
  <https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ>`_, ICLR workshop 2016.

Example:
  >>> import adam_jax, jax.numpy as jnp
  >>> tx = adam_jax.nadam(0.1)
  >>> updates, state = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
  >>> print(jnp.round(updates, 6))  # -0.1 * (0.9 * 0.1 / 0.19 + 0.1 / 0.1) at step 1
  [-0.147368]
""",
    nesterov=True,
)


nadamw = hyperparams.partial(
    adamw,
    """NAdamW: :func:`adamw` with ``nesterov=True`` (optax's ``nadamw``; a partial: it takes the
arguments of :func:`adamw`).

Returns:
  An ``optax.GradientTransformation``.

References:
  Dozat, `Incorporating Nesterov Momentum into Adam
  <https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ>`_, ICLR workshop 2016;
  Loshchilov and Hutter, `Decoupled Weight Decay Regularization
  <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.

Example:
  >>> import adam_jax, jax.numpy as jnp
  >>> params = jnp.array([10.0])
  >>> tx = adam_jax.nadamw(0.1, weight_decay=0.01)
  >>> updates, _ = tx.update(jnp.array([2.0]), tx.init(params), params)
  >>> print(jnp.round(updates, 6))  # nadam's step plus -0.1 * 0.01 * 10
  [-0.157368]
""",
    nesterov=True,
)

# doctest finds the examples of functions and classes only, not of partials.
__test__ = {"nadam": nadam.__doc__, "nadamw": nadamw.__doc__}


def amsgrad(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any = None,
    *,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""AMSGrad with PyTorch's semantics (``torch.optim.Adam(amsgrad=True)``): the running maximum
    of the raw second moment, bias-corrected afterwards (see :func:`adam_jax.scale_by_amsgrad`).

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Reddi, Kale and Kumar, `On the Convergence of Adam and Beyond
      <https://openreview.net/forum?id=ryQu7f-RZ>`_, ICLR 2018.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.amsgrad(0.1)
      >>> state = tx.init(jnp.zeros(1))
      >>> for g in (10.0, 0.1):
      ...     updates, state = tx.update(jnp.array([g]), state)
      >>> print(jnp.round(updates, 4))  # the first gradient's square still sets the denominator
      [-0.0677]
    """
    return descend(
        learning_rate,
        *adam_moments(b1, b2, eps, eps_root, mu_dtype, nu_dtype, amsgrad=True),
        maximize=maximize,
    )


def adamax(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""AdaMax: Adam with the infinity norm, a drop-in for ``optax.adamax``.

    .. math::
        \theta_t = \theta_{t-1} - \alpha(t) \frac{m_t}{(1-\beta_1^t)\, u^\infty_t}

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the infinity norm, in [0, 1).
      eps: added to :math:`|g_t|`, >= 0.
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_ (section 7.1), ICLR 2015.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.adamax(0.002, maximize=True)
      >>> updates, _ = tx.update(jnp.array([5.0, -0.5]), tx.init(jnp.zeros(2)))
      >>> print(updates)  # ascent: along the gradient
      [ 0.002 -0.002]
    """
    return descend(learning_rate, scale_by_adamax(b1, b2, eps), maximize=maximize)


def adamaxw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Mask | None = None,
    *,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""AdaMax with decoupled weight decay, a drop-in for ``optax.adamaxw``.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the infinity norm, in [0, 1).
      eps: added to :math:`|g_t|`, >= 0.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_ (section 7.1), ICLR 2015; Loshchilov and Hutter,
      `Decoupled Weight Decay Regularization <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = jnp.array([1.0, 100.0])
      >>> tx = adam_jax.adamaxw(0.01, weight_decay=0.1)
      >>> updates, _ = tx.update(jnp.zeros(2), tx.init(params), params)
      >>> print(jnp.round(updates, 6))  # decay only: -0.01 * 0.1 * params
      [-0.001 -0.1  ]
    """
    return descend(
        learning_rate,
        scale_by_adamax(b1, b2, eps),
        add_decayed_weights(weight_decay, mask),
        maximize=maximize,
    )


def _eight_bit_moments(block_size: int | None, min_size: int | None) -> dict[str, Any]:
    """:func:`adam_jax.eight_bit_moments` with its defaults for the arguments left ``None``."""
    given = {"block_size": block_size, "min_size": min_size}
    return eight_bit_moments(**{name: value for name, value in given.items() if value is not None})


def adam_8bit(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    nesterov: bool = False,
    eps_placement: str = "standard",
    maximize: bool = False,
    block_size: int | None = None,
    min_size: int | None = None,
) -> optax.GradientTransformation:
    """:func:`adam` with both moments in 8-bit block-wise quantized storage.

    Leaves of at least ``min_size`` elements keep their moments as one byte per element plus one
    float32 scale per block of ``block_size`` elements (see :mod:`adam_jax.quantization`);
    smaller leaves keep float32 moments.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      nesterov: Nesterov momentum (as NAdam).
      eps_placement: ``"standard"`` (PyTorch, optax) or ``"keras"`` (``eps`` added before the
        bias corrections, Keras' "epsilon hat").
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).
      block_size: elements that share one scale; ``None`` (the default) is 256.
      min_size: leaves with fewer elements keep float32 moments; ``None`` (the default) is
        4096. Both default to ``None`` rather than a number so that
        ``optax.inject_hyperparams(adam_8bit)`` works: it would inject a number as an array,
        and they fix shapes (pass ``static_args=("block_size", "min_size")`` to set them).

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Dettmers, Lewis, Shleifer and Zettlemoyer, `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = jnp.zeros((64, 128))
      >>> state = adam_jax.adam_8bit(1e-3).init(params)
      >>> bytes_per_param = adam_jax.state_bytes(state) / params.size
      >>> print(state[0].mu.codes.dtype, f"{bytes_per_param:.3f}")
      uint8 2.032
    """
    return adam(
        learning_rate, b1, b2, eps, eps_root,
        nesterov=nesterov, eps_placement=eps_placement, maximize=maximize,
        **_eight_bit_moments(block_size, min_size),
    )  # fmt: skip


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Mask | None = None,
    nesterov: bool = False,
    eps_placement: str = "standard",
    maximize: bool = False,
    block_size: int | None = None,
    min_size: int | None = None,
) -> optax.GradientTransformation:
    r""":func:`adamw` with both moments in 8-bit block-wise quantized storage.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      nesterov: Nesterov momentum (as NAdam).
      eps_placement: ``"standard"`` (PyTorch, optax) or ``"keras"`` (``eps`` added before the
        bias corrections, Keras' "epsilon hat").
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).
      block_size: elements that share one scale; ``None`` (the default) is 256.
      min_size: leaves with fewer elements keep float32 moments; ``None`` (the default) is
        4096. Both default to ``None`` rather than a number so that
        ``optax.inject_hyperparams(adam_8bit)`` works: it would inject a number as an array,
        and they fix shapes (pass ``static_args=("block_size", "min_size")`` to set them).

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Dettmers, Lewis, Shleifer and Zettlemoyer, `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, ICLR 2022; Loshchilov and Hutter, `Decoupled Weight
      Decay Regularization <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = {"w": jnp.ones((128, 64)), "b": jnp.ones(64)}
      >>> state = adam_jax.adamw_8bit(1e-3, weight_decay=0.01).init(params)
      >>> print(type(state[0].mu["w"]).__name__, state[0].mu["b"].dtype)  # small leaves: float32
      QuantizedArray float32
    """
    return adamw(
        learning_rate, b1, b2, eps, eps_root,
        weight_decay=weight_decay, mask=mask,
        nesterov=nesterov, eps_placement=eps_placement, maximize=maximize,
        **_eight_bit_moments(block_size, min_size),
    )  # fmt: skip


# The papers of the Adam family, each named once.
_ADAM = Paper(
    authors="Kingma and Ba",
    title="Adam: A Method for Stochastic Optimization",
    url="https://arxiv.org/abs/1412.6980",
    venue="ICLR 2015",
)
_ADAMW = Paper(
    authors="Loshchilov and Hutter",
    title="Decoupled Weight Decay Regularization",
    url="https://arxiv.org/abs/1711.05101",
    venue="ICLR 2019",
)
_NADAM = Paper(
    authors="Dozat",
    title="Incorporating Nesterov Momentum into Adam",
    url="https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ",
    venue="ICLR workshop 2016",
)
_AMSGRAD = Paper(
    authors="Reddi, Kale and Kumar",
    title="On the Convergence of Adam and Beyond",
    url="https://openreview.net/forum?id=ryQu7f-RZ",
    venue="ICLR 2018",
)
_EIGHT_BIT = Paper(
    authors="Dettmers, Lewis, Shleifer and Zettlemoyer",
    title="8-bit Optimizers via Block-wise Quantization",
    url="https://arxiv.org/abs/2110.02861",
    venue="ICLR 2022",
)

REGISTRY_ROWS = (
    OptimizerInfo(
        name="adam",
        alias=adam,
        group="adam",
        summary="bias-corrected first and second moments (Keras' epsilon hat as an option)",
        paper=_ADAM,
        transformation=scale_by_adam,
        rule=AdamRule,
        optax_name="optax.adam",
    ),
    OptimizerInfo(
        name="adamw",
        alias=adamw,
        group="adam",
        summary="Adam with decoupled weight decay",
        paper=_ADAMW,
        transformation=scale_by_adam,
        rule=AdamRule,
        optax_name="optax.adamw",
    ),
    OptimizerInfo(
        name="adam_l2",
        alias=adam_l2,
        group="adam",
        summary=(
            "Adam with L2 regularization added to the gradient (torch.optim.Adam's weight_decay)"
        ),
        paper=_ADAM,
        transformation=scale_by_adam,
        rule=AdamRule,
    ),
    OptimizerInfo(
        name="nadam",
        alias=nadam,
        group="adam",
        summary="Adam with Nesterov momentum",
        paper=_NADAM,
        transformation=scale_by_adam,
        rule=AdamRule,
        optax_name="optax.nadam",
    ),
    OptimizerInfo(
        name="nadamw",
        alias=nadamw,
        group="adam",
        summary="NAdam with decoupled weight decay",
        paper=_NADAM,
        transformation=scale_by_adam,
        rule=AdamRule,
        optax_name="optax.nadamw",
    ),
    OptimizerInfo(
        name="amsgrad",
        alias=amsgrad,
        group="adam",
        summary="the running maximum of the second moment (PyTorch's form)",
        paper=_AMSGRAD,
        transformation=scale_by_amsgrad,
        rule=AdamRule,
        optax_name="optax.amsgrad",
    ),
    OptimizerInfo(
        name="adamax",
        alias=adamax,
        group="adam",
        summary="the infinity norm in place of the second moment",
        paper=_ADAM,
        transformation=scale_by_adamax,
        rule=AdamaxRule,
        optax_name="optax.adamax",
        learning_rate=0.006,
    ),
    OptimizerInfo(
        name="adamaxw",
        alias=adamaxw,
        group="adam",
        summary="AdaMax with decoupled weight decay",
        paper=_ADAM,
        transformation=scale_by_adamax,
        rule=AdamaxRule,
        optax_name="optax.adamaxw",
        learning_rate=0.006,
    ),
    OptimizerInfo(
        name="adam_8bit",
        alias=adam_8bit,
        group="adam",
        summary="Adam with both moments in 8-bit blocks (about 2 bytes of state per parameter)",
        paper=_EIGHT_BIT,
        transformation=scale_by_adam,
        rule=AdamRule,
    ),
    OptimizerInfo(
        name="adamw_8bit",
        alias=adamw_8bit,
        group="adam",
        summary="AdamW with both moments in 8-bit blocks",
        paper=_EIGHT_BIT,
        transformation=scale_by_adam,
        rule=AdamRule,
    ),
)
