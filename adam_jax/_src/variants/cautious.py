r"""Cautious optimizers: skip the coordinates where the step and the gradient disagree.

Liang et al. (2024) mask a momentum optimizer's step where its sign differs from the current
gradient's, where following the momentum would increase the loss to first order, and rescale
the rest so that the step keeps its size on average: per tensor,
:math:`u \leftarrow u \odot \phi / \max(\mathrm{mean}(\phi), 10^{-3})` with
:math:`\phi = [u \odot g > 0]` (the scale and clamp of timm's ``caution=True``).
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from adam_jax.rules import (
    Leaf,
    Mask,
    OptimizerInfo,
    Paper,
    adam_moments,
    add_decayed_weights,
    compute_dtype,
    descend,
    map_tensors,
    real_dtype,
)

# The smallest fraction of agreeing coordinates the rescaling divides by (timm, C-Optim).
MIN_AGREEING_FRACTION = 1e-3


def _caution(update: jax.Array, grad: jax.Array, leaf: Leaf) -> jax.Array:
    """``update`` zeroed where it disagrees with ``grad`` in sign, rescaled per tensor."""
    u = update.astype(compute_dtype(update.dtype))
    g = jnp.asarray(grad).astype(u.dtype)
    alignment = jnp.real(u * jnp.conj(g)) if jnp.iscomplexobj(u) else u * g
    agree = alignment > 0
    # Counted from an int8 copy of the mask: XLA materializes it for the reduction, and a
    # float one would move four times the bytes.
    fraction = leaf.mean(agree.astype(jnp.int8), dtype=real_dtype(u.dtype))
    scale = jnp.where(agree, 1 / jnp.maximum(fraction, MIN_AGREEING_FRACTION), 0)
    return (u * scale).astype(update.dtype)


def cautious(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    r"""Makes the descent directions of ``inner`` cautious (Liang et al., 2024).

    .. math::
        \phi_t = [u_t \odot g_t > 0], \qquad
        u_t \leftarrow \frac{u_t \odot \phi_t}{\max(\mathrm{mean}(\phi_t), 10^{-3})}

    with :math:`u_t` the updates of ``inner``, :math:`g_t` the gradients it received, and the
    mean over each tensor (each leaf, also on :class:`adam_jax.FlatParams`). For complex params
    the agreement is :math:`\mathrm{Re}(u_t \bar g_t) > 0`.

    ``inner`` must return *descent directions* (what is subtracted from the params, the sign of
    the gradient): a moment estimate such as :func:`adam_jax.scale_by_adam`, or a chain of them,
    placed before the weight decay and the learning rate, as :func:`cautious_adamw` does. The
    state is ``inner``'s own, so a checkpoint of ``inner`` restores into ``cautious(inner)``.

    Args:
      inner: the transformation whose updates are masked.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``inner``'s state.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.cautious(adam_jax.scale_by_adam())
      >>> state = tx.init(jnp.zeros(4))
      >>> _, state = tx.update(jnp.array([1.0, 1.0, 1.0, 1.0]), state)
      >>> updates, _ = tx.update(jnp.array([1.0, -0.01, 1.0, -0.01]), state)
      >>> print(jnp.round(updates, 3))  # momentum against the gradient: masked, the rest doubled
      [2. 0. 2. 0.]
    """
    inner = optax.with_extra_args_support(inner)

    def update_fn(
        updates: optax.Updates, state: Any, params: optax.Params | None = None, **extra: Any
    ) -> tuple[optax.Updates, Any]:
        directions, state = inner.update(updates, state, params, **extra)
        return map_tensors(_caution, directions, updates), state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def cautious_adamw(
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
    r"""Cautious AdamW: :func:`adam_jax.adamw` whose Adam step is :func:`cautious`.

    .. math::
        \theta_t = \theta_{t-1} - \alpha(t) \left( \frac{u_t \odot \phi_t}
        {\max(\mathrm{mean}(\phi_t), 10^{-3})} + \lambda(t)\, \theta_{t-1} \right), \qquad
        u_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}, \quad
        \phi_t = [u_t \odot g_t > 0].

    As timm's ``AdamW(caution=True)`` (the decay term is not masked). Same arguments, defaults
    and state as :func:`adam_jax.adamw`: a checkpoint of one restores into the other.

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step (not masked by the caution).
      mask: which leaves to decay (a tree of bools or a callable of the params).
      nesterov: Nesterov momentum (as NAdam).
      nu_dtype: storage of the second moment, as ``mu_dtype``.
      eps_placement: ``"standard"`` (PyTorch, optax) or ``"keras"`` (``eps`` added before the
        bias corrections, Keras' "epsilon hat"; the caution comes before the corrections, a
        positive factor).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation``.

    References:
      Liang, Chen, Liu and Liu, `Cautious Optimizers: Improving Training with One Line of Code
      <https://arxiv.org/abs/2411.16085>`_, 2024.

    Example:
      >>> import adam_jax, jax, jax.numpy as jnp
      >>> params = jnp.zeros(3)
      >>> tx = adam_jax.cautious_adamw(0.1)
      >>> same = jax.tree.structure(adam_jax.adamw(0.1).init(params))
      >>> print(jax.tree.structure(tx.init(params)) == same)  # adamw's state
      True
    """
    step, *correction = adam_moments(
        b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov, eps_placement
    )
    return descend(
        learning_rate,
        cautious(step),
        *correction,
        add_decayed_weights(weight_decay, mask),
        maximize=maximize,
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="cautious_adamw",
        alias=cautious_adamw,
        group="variant",
        summary="AdamW whose update is zeroed where it disagrees in sign with the gradient",
        paper=Paper(
            authors="Liang, Chen, Liu and Liu",
            title="Cautious Optimizers: Improving Training with One Line of Code",
            url="https://arxiv.org/abs/2411.16085",
            venue="2024",
        ),
        companions=("cautious",),
    ),
)
