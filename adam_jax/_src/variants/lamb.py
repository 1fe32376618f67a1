r"""LAMB: Adam's step rescaled per tensor to a fixed fraction of the tensor's norm.

You et al. (2020) train BERT with batches of 64k by giving every layer a step proportional to
its weights: the Adam direction (weight decay included) is multiplied by the layer's trust
ratio :math:`\|\theta\| / \|u\|`, so each layer moves by :math:`\alpha \|\theta\|` whatever the
scale of its gradients.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from adam_jax import rules
from adam_jax.rules import (
    Leaf,
    Mask,
    OptimizerInfo,
    Paper,
    abs_sq,
    add_decayed_weights,
    compute_dtype,
    descend,
    map_tensors,
    scale_by_adam,
)


def scale_by_trust_ratio(
    min_norm: float = 0.0, trust_coefficient: float = 1.0, eps: float = 0.0
) -> optax.GradientTransformation:
    r"""Scales each tensor's update by its trust ratio :math:`c\,\|\theta\| / (\|u\| +
    \epsilon)`.

    .. math::
        u \leftarrow u \cdot \begin{cases} c\, \frac{\max(\|\theta\|, n_{min})}
        {\max(\|u\|, n_{min}) + \epsilon} & \|\theta\| > 0 \text{ and } \|u\| > 0 \\
        1 & \text{otherwise} \end{cases}

    A drop-in for ``optax.scale_by_trust_ratio`` (same arguments and state), with the norms
    computed in at least float32 (a bfloat16 sum of squares of a large tensor loses most of its
    digits) and taken per packed tensor on :class:`adam_jax.FlatParams`.

    Args:
      min_norm: floor of both norms, >= 0.
      trust_coefficient: :math:`c`, >= 0.
      eps: added to the update's norm, >= 0.

    Returns:
      An ``optax.GradientTransformation`` with ``optax.EmptyState``; ``update`` needs params.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_trust_ratio()
      >>> params, updates = jnp.array([3.0, 4.0]), jnp.array([0.0, 0.5])
      >>> print(tx.update(updates, tx.init(params), params)[0])  # |params| / |updates| = 10
      [0. 5.]
    """
    rules.check_non_negative("min_norm", min_norm)
    rules.check_non_negative("trust_coefficient", trust_coefficient)
    rules.check_non_negative("eps", eps)

    def scale(update: jax.Array, param: jax.Array, leaf: Leaf) -> jax.Array:
        u = update.astype(compute_dtype(update.dtype))
        p = jnp.asarray(param)
        p = p.astype(compute_dtype(p.dtype))
        param_norm = jnp.maximum(jnp.sqrt(leaf.sum(abs_sq(p))), min_norm)
        update_norm = jnp.maximum(jnp.sqrt(leaf.sum(abs_sq(u))), min_norm)
        ratio = trust_coefficient * param_norm / (update_norm + eps)
        ratio = jnp.where((param_norm == 0) | (update_norm == 0), 1.0, ratio)
        return (u * ratio).astype(update.dtype)

    def update_fn(
        updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        if params is None:
            raise ValueError(
                "scale_by_trust_ratio needs params: call update(updates, state, params)"
            )
        return map_tensors(scale, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def lamb(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""LAMB: a drop-in for ``optax.lamb`` (You et al., 2020, Algorithm 2).

    .. math::
        r_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}
        + \lambda(t)\, \theta_{t-1}, \qquad
        \theta_t = \theta_{t-1} - \alpha(t) \frac{\|\theta_{t-1}\|}{\|r_t\|} r_t

    with the norms per tensor (a trust ratio of 1 where either is zero): a chain of
    :func:`adam_jax.scale_by_adam`, :func:`adam_jax.add_decayed_weights`,
    :func:`adam_jax.scale_by_trust_ratio` and the learning rate, with the state of
    ``optax.lamb``.

    Args:
      learning_rate: a constant >= 0 or a schedule.
      b1, b2, eps, eps_root: as in :func:`adam_jax.scale_by_adam` (LAMB's ``eps`` is 1e-6).
      weight_decay: :math:`\lambda`, a constant >= 0 or a schedule of the step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      mu_dtype, nu_dtype: storage of the moments (``None``, a dtype or a ``MomentStorage``).
      maximize: ascend the objective instead of descending.

    Returns:
      An ``optax.GradientTransformation``.

    References:
      You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer and Hsieh, `Large Batch
      Optimization for Deep Learning: Training BERT in 76 minutes
      <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = jnp.array([3.0, 4.0])
      >>> tx = adam_jax.lamb(0.1)
      >>> updates, _ = tx.update(jnp.array([1.0, 0.0]), tx.init(params), params)
      >>> print(jnp.round(updates, 4))  # a step of 0.1 * |params| = 0.5
      [-0.5  0. ]
    """
    return descend(
        learning_rate,
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nu_dtype=nu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_trust_ratio(),
        maximize=maximize,
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="lamb",
        alias=lamb,
        group="variant",
        summary="AdamW's update scaled per layer by the ratio of the param's norm to the update's",
        paper=Paper(
            authors="You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer and Hsieh",
            title="Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
            url="https://arxiv.org/abs/1904.00962",
            venue="ICLR 2020",
        ),
        transformation=scale_by_trust_ratio,
        optax_name="optax.lamb",
        # A step is a fraction of each layer's norm: it needs more (2 epochs on 12,000 images:
        # 94.7% at 3e-3, 98.4% at 2e-2, 96.7% at 5e-2).
        learning_rate=0.02,
    ),
)
