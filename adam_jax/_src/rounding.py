r"""Stochastically rounded updates for low-precision params.

Rounding ``params + update`` to the nearest bfloat16 drops every update smaller than half an ulp;
rounding it up or down at random, with the probabilities that make the result right on
average, keeps their expected sum: the params follow the float32 trajectory in expectation with
no buffer at all (torchao's bfloat16 stochastic rounding; Zamirai et al., 2020).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adam_jax._src.low_precision import landing_update, map_low_precision, require_params
from adam_jax._src.sequencing import after
from adam_jax._src.typed_sharding import replicated, reshard, typed_sharding


class StochasticRoundingState(NamedTuple):
    """The inner transformation's state and the key of the next step (raw ``uint32`` key data,
    so that checkpoints store it as an ordinary array)."""

    inner_state: Any
    key: jax.Array


def raw_key(key: jax.Array | int) -> jax.Array:
    """``key`` (an int seed, a new-style ``jax.random`` key or raw ``uint32`` key data) as raw
    key data, the form a state keeps (an integer scalar array is a seed too:
    ``optax.inject_hyperparams`` injects numbers as arrays)."""
    if isinstance(key, int) or (
        jnp.ndim(key) == 0 and jnp.issubdtype(jnp.result_type(key), jnp.integer)
    ):
        key = jax.random.key(key)
    if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return jnp.asarray(key)


def round_stochastically(x: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
    r"""``x`` rounded to ``dtype``, to one of its two neighbours :math:`a \leq x \leq b` in
    ``dtype``, to :math:`b` with probability :math:`(x - a)/(b - a)`: unbiased,
    :math:`\mathbb{E}[\mathrm{round}(x)] = x`. Values of ``dtype`` stay as they are; so do
    infinities and NaNs.

    Args:
      x: float32 values.
      dtype: the target dtype (bfloat16, float16).
      key: a ``jax.random`` key; each element draws its own bits (with
        ``jax_threefry_partitionable``, the default, also on sharded arrays).

    Returns:
      An array of ``dtype``.
    """
    nearest = x.astype(dtype)
    above = nearest.astype(x.dtype) > x
    # The neighbour on the other side of x than the nearest value.
    other = jnp.nextafter(nearest, jnp.where(above, -jnp.inf, jnp.inf).astype(dtype))
    low = jnp.where(above, other, nearest).astype(x.dtype)
    high = jnp.where(above, nearest, other).astype(x.dtype)
    gap = high - low
    up_probability = jnp.where(gap > 0, (x - low) / jnp.where(gap > 0, gap, 1), 0)
    up = jax.random.uniform(key, x.shape, x.dtype) < up_probability
    rounded = jnp.where(up, high, low).astype(dtype)
    return jnp.where(jnp.isfinite(x) & jnp.isfinite(rounded), rounded, nearest)


def stochastic_rounding(
    inner: optax.GradientTransformation, key: jax.Array | int
) -> optax.GradientTransformationExtraArgs:
    r"""Applies ``inner``'s updates to bfloat16 and float16 params with stochastic rounding.

    For each low-precision param :math:`\theta` and ``inner``'s update :math:`u`:
    :math:`\theta' = \mathrm{SR}(\theta + u)`, the float32 sum rounded to the param's dtype at
    random (:func:`round_stochastically`), so that :math:`\mathbb{E}[\theta'] = \theta + u`.
    The returned updates (in ``inner``'s dtype) move the params to :math:`\theta'` under
    ``optax.apply_updates``: exactly for float32 updates, and for updates in the params' dtype
    whenever the step changes a param by less than a factor of two (see
    :func:`adam_jax.kahan_summation`).

    The key is carried in the state and split at every step: the same key gives the same
    params, under ``jit`` or not, after a resume from a checkpoint of the state as without it,
    and on sharded params (each element draws its own bits, so each shard rounds with
    different ones). float32 and float64 params (and non-float ones) are left as ``inner``
    updates them. Wrap the whole optimizer; ``optax.MultiSteps`` and
    ``optax.apply_if_finite`` go around it.

    Args:
      inner: the optimizer, e.g. :func:`adam_jax.adamw`.
      key: a ``jax.random`` key (new-style or raw ``uint32``), or an int seed.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`StochasticRoundingState`; ``update`` needs params.

    References:
      Zamirai, Zhang, Aberger and De Sa, `Revisiting BFloat16 Training
      <https://arxiv.org/abs/2010.06192>`_, 2020.

    Example:
      >>> import adam_jax, jax, jax.numpy as jnp, optax
      >>> params = jnp.ones(1000, jnp.bfloat16)
      >>> tx = adam_jax.stochastic_rounding(optax.sgd(1e-3), key=0)
      >>> state = tx.init(params)
      >>> for _ in range(100):  # each step alone is below half a bfloat16 ulp (2**-8)
      ...     updates, state = tx.update(jnp.ones(1000, jnp.bfloat16), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(params.dtype, f"{params.astype(jnp.float32).mean():.2f}")  # 1 - 100 * 1e-3
      bfloat16 0.90
    """
    initial_key = raw_key(key)

    def init_fn(params: optax.Params) -> StochasticRoundingState:
        return StochasticRoundingState(inner.init(params), initial_key)

    def update_fn(
        updates: optax.Updates,
        state: StochasticRoundingState,
        params: optax.Params | None = None,
        **extra: Any,
    ) -> tuple[optax.Updates, StochasticRoundingState]:
        params = require_params("stochastic_rounding", params)
        updates, inner_state = optax.with_extra_args_support(inner).update(
            updates, state.inner_state, params, **extra
        )
        # A key's words go whole into the draw (ZeRO-1 may have split them over devices).
        key, step_key = jax.random.split(jax.random.wrap_key_data(replicated(state.key)))
        split = jax.random.split(step_key, len(jax.tree.leaves(params)))
        leaf_keys = iter(jax.random.key_data(split))
        previous: jax.Array | None = None  # the last leaf's rounded param

        def round_leaf(update: jax.Array, param: jax.Array) -> tuple[Any, None]:
            nonlocal previous
            # One leaf's random bits and float32 sum at a time (adam_jax._src.sequencing).
            update, param, leaf_key = after(previous, (update, param, next(leaf_keys)))
            total = param.astype(jnp.float32) + update.astype(jnp.float32)
            rounded = round_stochastically(total, param.dtype, jax.random.wrap_key_data(leaf_key))
            previous = rounded
            return landing_update(param, rounded, update.dtype)[0], None

        updates, _ = map_low_precision(round_leaf, updates, params)
        next_key = reshard(jax.random.key_data(key), typed_sharding(state.key))
        return updates, StochasticRoundingState(inner_state, next_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
