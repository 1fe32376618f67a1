r"""Kahan-compensated updates for low-precision params.

With bfloat16 params most Adam updates are smaller than half an ulp of the param and round
away: the params stop moving while float32 ones would still learn. Kahan summation keeps, per
param, the part of the sum that the rounding dropped, and adds it back at the next step, so
the params follow the float32 trajectory to within one rounding (Zamirai et al., 2020;
torch-optimi's ``kahan_sum``), at the price of one buffer per param in a low-precision dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adam_jax._src.low_precision import (
    is_low_precision,
    landing_update,
    map_low_precision,
    require_params,
)


class KahanSummationState(NamedTuple):
    """The inner transformation's state, and the compensation of each low-precision param
    (``optax.MaskedNode()`` for the others)."""

    inner_state: Any
    compensation: Any


def kahan_summation(
    inner: optax.GradientTransformation, compensation_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
    r"""Applies ``inner``'s updates to bfloat16 and float16 params with Kahan summation.

    For each low-precision param :math:`\theta` with compensation :math:`c` (initially 0) and
    ``inner``'s update :math:`u`, in float32:

    .. math::
        s = \theta + (c + u), \qquad \theta' = \mathrm{round}(s), \qquad
        c' = \mathrm{round}_c(s - \theta'),

    with :math:`\mathrm{round}` to the param's dtype (to nearest) and :math:`\mathrm{round}_c`
    to the compensation's. The returned updates (in ``inner``'s dtype) move the params to
    :math:`\theta'` under ``optax.apply_updates``: exactly for float32 updates, and for updates
    in the params' dtype whenever the step changes a param by less than a factor of two; where a
    larger step makes ``apply_updates`` round once more, :math:`c'` is taken against the param
    it lands on, so param + compensation follows the sum of the updates to within the
    compensation's rounding either way. This is torch-optimi's ``kahan_sum`` (Zamirai et al.,
    2020), computed in float32 rather than in the params' dtype.

    float32 and float64 params (and non-float ones) are left as ``inner`` updates them, with no
    buffer. Wrap the whole optimizer (weight decay and learning rate included) and keep it
    outermost but for ``optax.MultiSteps`` and ``optax.apply_if_finite``, which go around it.

    Args:
      inner: the optimizer, e.g. :func:`adam_jax.adamw`.
      compensation_dtype: dtype of the compensation buffers (``None``: each param's own dtype,
        2 bytes per bfloat16 param; float32 makes :math:`\theta + c` a float32-accurate copy).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`KahanSummationState`; ``update`` needs params.

    References:
      Zamirai, Zhang, Aberger and De Sa, `Revisiting BFloat16 Training
      <https://arxiv.org/abs/2010.06192>`_, 2020.

    Example:
      >>> import adam_jax, jax.numpy as jnp, optax
      >>> params = jnp.ones(4, jnp.bfloat16)
      >>> tx = adam_jax.kahan_summation(optax.sgd(1e-3))
      >>> state = tx.init(params)
      >>> for _ in range(100):  # each step alone is below half a bfloat16 ulp (2**-8)
      ...     updates, state = tx.update(jnp.ones(4, jnp.bfloat16), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.dtype, params)
      bfloat16 [0.898438 0.898438 0.898438 0.898438]
    """
    if compensation_dtype is not None and not jnp.issubdtype(compensation_dtype, jnp.floating):
        raise ValueError(
            f"compensation_dtype must be a floating-point dtype (or None), got {compensation_dtype}"
        )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> KahanSummationState:
        def buffer(param: Any) -> Any:
            if not is_low_precision(param):
                return optax.MaskedNode()
            return jnp.zeros_like(param, dtype=compensation_dtype or jnp.result_type(param))

        return KahanSummationState(inner.init(params), jax.tree.map(buffer, params))

    def update_fn(
        updates: optax.Updates,
        state: KahanSummationState,
        params: optax.Params | None = None,
        **extra: Any,
    ) -> tuple[optax.Updates, KahanSummationState]:
        params = require_params("kahan_summation", params)
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra)

        def compensate(update: jax.Array, param: jax.Array, c: jax.Array) -> tuple[Any, Any]:
            total = param.astype(jnp.float32) + (c.astype(jnp.float32) + update)
            update, landed = landing_update(param, total.astype(param.dtype), update.dtype)
            return update, (total - landed.astype(jnp.float32)).astype(c.dtype)

        treedef: Any = jax.tree.structure(params)  # its methods are untyped in jax's stubs
        compensation = treedef.flatten_up_to(state.compensation)
        updates, new_compensation = map_low_precision(compensate, updates, params, compensation)
        return updates, KahanSummationState(inner_state, treedef.unflatten(new_compensation))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
