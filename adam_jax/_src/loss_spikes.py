r"""Skipping the steps of loss spikes.

A batch whose loss is far above the recent ones (a bad batch, a numerical accident) gives a
gradient that can throw a large model off for thousands of steps. MaxText's
``skip_step_on_spikes`` drops such steps: the loss is compared with the mean and standard
deviation of a window of recent losses, and a step whose loss is too many deviations above
the mean is not applied. Here the same test wraps any optax transformation, inside ``jit``,
without a round trip to the host.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adam_jax._src import validation


class SkipLossSpikesState(NamedTuple):
    """The state of :func:`skip_loss_spikes`.

    Attributes:
      inner_state: the wrapped transformation's state (unchanged by a skipped step).
      losses: the ring buffer of the last ``window`` accepted losses (float32, ``(window,)``);
        the loss of accepted step ``k`` (0-based) sits at ``k % window``.
      accepted: the number of accepted losses so far (int32); ``min(accepted, window)``
        entries of ``losses`` are in use.
      skipped: the number of skipped steps so far (int32).
    """

    inner_state: Any
    losses: jax.Array
    accepted: jax.Array
    skipped: jax.Array


def _window_mean_std(losses: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The mean and (population) standard deviation of the entries of ``losses`` in use."""
    in_use = jnp.arange(losses.shape[0]) < count
    n = jnp.maximum(jnp.minimum(count, losses.shape[0]), 1).astype(losses.dtype)
    mean = jnp.sum(jnp.where(in_use, losses, 0), dtype=losses.dtype) / n
    # Two passes: the losses are close to each other, and E[x^2] - E[x]^2 would cancel.
    variance = jnp.sum(jnp.where(in_use, jnp.square(losses - mean), 0), dtype=losses.dtype) / n
    return mean, jnp.sqrt(variance)


def is_loss_spike(
    loss: jax.Array, losses: jax.Array, count: jax.Array, threshold: Any, min_history: int
) -> jax.Array:
    """Whether :func:`skip_loss_spikes` skips a step of loss ``loss`` given its window."""
    mean, std = _window_mean_std(losses, count)
    judged = count >= min_history
    return ~jnp.isfinite(loss) | (judged & (loss > mean + threshold * std))


def skip_loss_spikes(
    inner: optax.GradientTransformation,
    window: int = 128,
    threshold: float = 6.0,
    *,
    min_history: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips the steps whose loss spikes above the recent ones (MaxText's
    ``skip_step_on_spikes``).

    With :math:`\mu` and :math:`\sigma` the mean and (population) standard deviation of the
    last ``window`` accepted losses, a step of loss :math:`\ell` is skipped when

    .. math::
        \ell > \mu + \tau \sigma \quad (\text{once at least } h \text{ losses are recorded})
        \qquad \text{or} \qquad \ell \text{ is not finite},

    with :math:`\tau` = ``threshold`` and :math:`h` = ``min_history``. A skipped step returns
    zero updates, keeps ``inner``'s state as it was (bit for bit: ``inner``'s update is
    computed but not kept) and counts one in ``skipped``. Its loss is *not* added to the
    window, so that a spike does not widen the band that judges the next steps; the price is
    that a lasting jump of the loss level above the band skips every step from then on:
    watch ``state.skipped`` (or raise ``threshold``). Non-finite losses (NaN, inf) are always
    skipped, also before the window holds ``min_history`` losses. The decision is made on the
    device (``jnp.where`` on the trees): no host round trip, and it works under ``jit``,
    ``vmap`` and ``optax.chain``.

    ``update`` needs the step's loss as the keyword ``value``, as
    ``optax.contrib.reduce_on_plateau`` takes it (``optax.chain`` passes it on to every
    transformation; ``inner`` gets it too). Wrap the whole optimizer; the state is a
    :class:`SkipLossSpikesState`.

    Args:
      inner: the optimizer whose steps are skipped, e.g. :func:`adam_jax.adamw`.
      window: the number of recent accepted losses the statistics are taken over, an integer
        >= 2.
      threshold: :math:`\tau`, the number of standard deviations above the mean a loss must
        exceed to be skipped, finite and > 0.
      min_history: the number of accepted losses before spikes are judged, in
        ``[2, window]``; ``None`` (the default) is ``window``: as MaxText, judge only against a
        full window (non-finite losses are skipped from the first step).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params,
      value=loss)`` needs ``value``.

    Example:
      >>> import adam_jax, jax.numpy as jnp, optax
      >>> tx = adam_jax.skip_loss_spikes(optax.sgd(0.1), window=4, threshold=3.0)
      >>> params = jnp.ones(2)
      >>> state = tx.init(params)
      >>> for loss in [1.0, 1.1, 0.9, 1.0, 5.0, 1.05]:
      ...     updates, state = tx.update(jnp.ones(2), state, params, value=loss)
      ...     params = optax.apply_updates(params, updates)
      >>> print(state.skipped, state.accepted, params)  # 5.0 was skipped: 5 steps of -0.1
      1 5 [0.5 0.5]
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer >= 2, got {window!r}")
    validation.check_positive("threshold", threshold)
    if min_history is None:
        min_history = window
    if (
        isinstance(min_history, bool)
        or not isinstance(min_history, int)
        or not 2 <= min_history <= window
    ):
        raise ValueError(
            f"min_history must be None or an integer in [2, window], got {min_history!r}"
        )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> SkipLossSpikesState:
        return SkipLossSpikesState(
            inner_state=inner.init(params),
            losses=jnp.zeros([window], jnp.float32),
            accepted=jnp.zeros([], jnp.int32),
            skipped=jnp.zeros([], jnp.int32),
        )

    def update_fn(
        updates: optax.Updates,
        state: SkipLossSpikesState,
        params: optax.Params | None = None,
        **extra: Any,
    ) -> tuple[optax.Updates, SkipLossSpikesState]:
        if "value" not in extra:
            raise ValueError(
                "skip_loss_spikes needs the step's loss: call "
                "update(updates, state, params, value=loss)"
            )
        value = jnp.asarray(extra["value"])
        if value.size != 1:
            raise ValueError(f"value must be a scalar loss, got shape {value.shape}")
        loss = value.reshape(()).astype(jnp.promote_types(value.dtype, jnp.float32))
        skip = is_loss_spike(loss, state.losses, state.accepted, threshold, min_history)

        new_updates, new_inner_state = inner.update(updates, state.inner_state, params, **extra)
        new_updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
        inner_state = jax.tree.map(
            lambda old, new: jnp.where(skip, old, new), state.inner_state, new_inner_state
        )
        recorded = state.losses.at[state.accepted % window].set(loss.astype(state.losses.dtype))
        return new_updates, SkipLossSpikesState(
            inner_state=inner_state,
            losses=jnp.where(skip, state.losses, recorded),
            accepted=jnp.where(skip, state.accepted, optax.safe_increment(state.accepted)),
            skipped=jnp.where(skip, optax.safe_increment(state.skipped), state.skipped),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
