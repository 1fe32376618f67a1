r"""Cautious weight decay: decay only the coordinates where the update already shrinks the param.

Chen et al. (2025) apply decoupled weight decay only where the optimizer's update and the
parameter have the same sign, that is where the step :math:`-\alpha u` already moves the
parameter towards zero; elsewhere the decay would fight the update. The optimizer's own
objective is then left unchanged (no implicit L2 penalty), and the iterates find
sliding-mode solutions that are locally Pareto-optimal for the loss and the parameters' size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from adam_jax._src.weight_decay import Mask, decayed_weights


def _agree(u: jax.Array, p: jax.Array) -> jax.Array:
    """Where ``u`` and ``p`` agree in sign (``u p >= 0``; for complex, :math:`\\mathrm{Re}(u
    \\bar p) \\geq 0`)."""
    alignment = jnp.real(u * jnp.conj(p)) if jnp.iscomplexobj(u) else u * p
    return alignment >= 0


def cautious_weight_decay(
    weight_decay: optax.ScalarOrSchedule, mask: Mask | None = None
) -> optax.GradientTransformation:
    r"""Adds the decay term where the update and the param agree in sign (Chen et al., 2025).

    .. math::
        u_t \leftarrow u_t + \lambda(t)\, \theta_{t-1} \odot
        \mathbb{1}\!\left[u_t \odot \theta_{t-1} \geq 0\right]

    Place it where ``optax.add_decayed_weights`` goes: after the moment estimate and before
    the learning rate, so that the step is
    :math:`\theta_t = \theta_{t-1} - \alpha(t)\,(u_t + \lambda(t)\, \theta_{t-1} \odot
    \mathbb{1}[\dots])`, as the paper's Algorithm 1 (for Adam, Lion and Muon alike). The
    indicator is the paper's, :math:`u \theta \geq 0`: coordinates whose update is exactly zero
    are decayed as by AdamW (with a strict :math:`> 0` they would not be), and zero params
    decay by zero either way. For complex params the agreement is
    :math:`\mathrm{Re}(u \bar\theta) \geq 0`. The term is computed in at least float32 and the
    updates keep their dtype; states are ``optax.add_decayed_weights``'s (``optax.EmptyState``
    for a constant, a step count for a schedule).

    Args:
      weight_decay: :math:`\lambda`, a finite constant >= 0, or a schedule ``step -> rate``
        (the first update uses its value at step 0).
      mask: a pytree of bools with the params' structure (or a prefix of it), or a callable
        returning one from the params; leaves marked ``False`` are not decayed.

    Returns:
      An ``optax.GradientTransformation``; its ``update`` requires ``params`` unless the rate
      is a constant zero (which leaves the updates untouched).

    References:
      Chen, Li, Liang, Su, Xie, Pierse, Liang, Lao and Liu, `Cautious Weight Decay
      <https://arxiv.org/abs/2510.12402>`_, 2025.

    Example:
      >>> import adam_jax, jax.numpy as jnp, optax
      >>> tx = adam_jax.cautious_weight_decay(0.5)
      >>> params = jnp.array([1.0, 1.0, -2.0, -2.0])
      >>> updates = jnp.array([0.1, -0.1, -0.1, 0.1])
      >>> decayed, _ = tx.update(updates, tx.init(params), params)
      >>> print(decayed)  # decayed where the update and the param have the same sign
      [ 0.6 -0.1 -1.1  0.1]
    """
    return decayed_weights(
        "cautious_weight_decay",
        weight_decay,
        mask,
        lambda u, p, rate: u + jnp.where(_agree(u, p), rate * p, 0),
    )
