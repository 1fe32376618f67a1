r"""Update RMS clipping: each tensor's update scaled down to a largest root mean square.

Levanter's ``update_rms_clipping`` chains it after the optimizer: a step whose update is much
larger than usual, per tensor, is shrunk to a fixed RMS instead of being applied in full
(Adam's normalized updates have an RMS of about 1 before the learning rate).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from adam_jax._src import validation
from adam_jax._src.numerics import abs_sq, compute_dtype, real_dtype
from adam_jax._src.rule import Leaf, map_tensors


def _clip_rms(update: jax.Array, max_rms: Any, leaf: Leaf) -> jax.Array:
    """``update`` scaled by ``max_rms / rms`` where its RMS exceeds ``max_rms``."""
    u = update.astype(compute_dtype(update.dtype))
    rms = jnp.sqrt(leaf.mean(abs_sq(u), dtype=real_dtype(u.dtype)))
    # The division only where it is taken: a zero update has RMS 0 and stays as it is.
    scale = jnp.where(rms > max_rms, max_rms / jnp.where(rms > max_rms, rms, 1), 1)
    return (u * scale).astype(update.dtype)


def clip_update_rms(max_rms: float) -> optax.GradientTransformation:
    r"""Scales each tensor's update down to an RMS of at most ``max_rms``.

    .. math::
        \mathrm{rms}(u) = \sqrt{\tfrac{1}{n} \textstyle\sum_i |u_i|^2}, \qquad
        u \leftarrow u \cdot \min\!\left(1, \frac{r_{\max}}{\mathrm{rms}(u)}\right)

    per tensor (per leaf of the tree, per packed tensor of :class:`adam_jax.FlatParams`), as
    Levanter's ``update_rms_clipping``. It acts on whatever updates it receives: chained
    after a moment estimate and before the learning rate (``optax.chain(scale_by_adam(),
    clip_update_rms(1.0), scale_by_learning_rate(lr))``) ``max_rms`` bounds the normalized
    update, of RMS about 1 for Adam; chained after a whole optimizer (``optax.chain(adamw(lr),
    clip_update_rms(r))``) it bounds the step itself, and ``max_rms`` must then be of the
    order of the learning rate. Complex updates use :math:`|u_i|`. The arithmetic is in at
    least float32; the updates keep their dtype. Stateless: the state is
    ``optax.EmptyState()``.

    Args:
      max_rms: the largest RMS an update keeps, finite and > 0.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.clip_update_rms(1.0)
      >>> updates = {"big": jnp.array([3.0, -4.0]), "small": jnp.array([0.5, 0.5])}
      >>> clipped, _ = tx.update(updates, tx.init(updates))
      >>> rms = jnp.sqrt(jnp.mean(clipped["big"] ** 2))
      >>> print(f"{rms:.4f}", clipped["small"])  # RMS 3.54 scaled to 1; RMS 0.5 kept
      1.0000 [0.5 0.5]
    """
    validation.check_positive("max_rms", max_rms)

    def init_fn(params: optax.Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del params
        clipped = map_tensors(lambda u, leaf: _clip_rms(u, max_rms, leaf), updates)
        return clipped, state

    return optax.GradientTransformation(init_fn, update_fn)
