"""Learning-rate schedules that practitioners use and optax lacks.

Each returns an ``optax.Schedule`` (a function of the integer step), so it works wherever optax
takes a learning rate or a weight decay, including ``optax.inject_hyperparams``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from adam_jax._src import validation

DECAY_TYPES = ("linear", "cosine", "sqrt")


def _steps_as_float(count: jax.typing.ArrayLike) -> jax.Array:
    return jnp.asarray(count).astype(jnp.result_type(float))


def _check_values(**values: float) -> None:
    for name, value in values.items():
        number = validation.static_float(value)
        if number is not None and not math.isfinite(number):
            raise ValueError(f"{name} must be finite, got {value!r}")


def _linear_ramp(
    steps: jax.Array, start: jax.typing.ArrayLike, end: jax.typing.ArrayLike, length: int
) -> jax.Array:
    """``start`` at step 0 rising linearly to ``end`` at step ``length``."""
    start, end = jnp.asarray(start), jnp.asarray(end)
    return start + (end - start) * steps / max(length, 1)


def warmup_stable_decay_schedule(
    peak_value: float,
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    init_value: float = 0.0,
    end_value: float = 0.0,
    decay_type: str = "linear",
) -> optax.Schedule:
    r"""Warmup-stable-decay ("trapezoidal", WSD; Hu et al., 2024, Hägele et al., 2024).

    .. math::
        \alpha(t) = \begin{cases}
          \alpha_0 + (\alpha_{peak} - \alpha_0)\, t / W & t < W \\
          \alpha_{peak} & W \le t < W + S \\
          \alpha_{end} + (\alpha_{peak} - \alpha_{end})\, d\!\left(\frac{t - W - S}{D}\right)
            & W + S \le t < W + S + D \\
          \alpha_{end} & t \ge W + S + D
        \end{cases}

    with :math:`d(x) = 1 - x` (linear), :math:`(1 + \cos \pi x)/2` (cosine) or
    :math:`1 - \sqrt{x}` (sqrt).

    Args:
      peak_value: the rate during the stable phase.
      warmup_steps: :math:`W`, steps of linear warmup from ``init_value``.
      stable_steps: :math:`S`, steps at ``peak_value``.
      decay_steps: :math:`D`, steps of decay to ``end_value``.
      init_value: the rate at step 0.
      end_value: the rate after the decay.
      decay_type: ``"linear"``, ``"cosine"`` or ``"sqrt"``.

    Returns:
      An ``optax.Schedule``.

    Example:
      >>> import adam_jax
      >>> lr = adam_jax.warmup_stable_decay_schedule(1.0, 100, 800, 100)
      >>> print([float(lr(t)) for t in (0, 50, 100, 900, 950, 1000)])
      [0.0, 0.5, 1.0, 1.0, 0.5, 0.0]
    """
    for name, steps in (("warmup_steps", warmup_steps), ("stable_steps", stable_steps),
                        ("decay_steps", decay_steps)):  # fmt: skip
        validation.check_steps(name, steps)
    _check_values(peak_value=peak_value, init_value=init_value, end_value=end_value)
    validation.check_choice("decay_type", decay_type, DECAY_TYPES)
    decay_start = warmup_steps + stable_steps

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        steps = _steps_as_float(count)
        if decay_steps:
            fraction = jnp.clip((steps - decay_start) / decay_steps, 0.0, 1.0)
        else:  # no decay phase: the end value from step W + S on
            fraction = (steps >= decay_start).astype(steps.dtype)
        if decay_type == "linear":
            remaining = 1.0 - fraction
        elif decay_type == "cosine":
            remaining = 0.5 * (1.0 + jnp.cos(jnp.pi * fraction))
        else:
            remaining = 1.0 - jnp.sqrt(fraction)
        decayed = end_value + (peak_value - end_value) * remaining
        warming = _linear_ramp(steps, init_value, peak_value, warmup_steps)
        return jnp.where(
            steps < warmup_steps, warming, jnp.where(steps < decay_start, peak_value, decayed)
        )

    return schedule


def inverse_sqrt_schedule(
    peak_value: float, warmup_steps: int, init_value: float = 0.0
) -> optax.Schedule:
    r"""Linear warmup, then decay with the inverse square root of the step (Vaswani et al., 2017).

    .. math::
        \alpha(t) = \begin{cases}
          \alpha_0 + (\alpha_{peak} - \alpha_0)\, t / W & t < W \\
          \alpha_{peak} \sqrt{W / t} & t \ge W
        \end{cases}

    Args:
      peak_value: the rate at step ``warmup_steps``.
      warmup_steps: :math:`W \ge 1`.
      init_value: the rate at step 0.

    Returns:
      An ``optax.Schedule``.

    Example:
      >>> import adam_jax
      >>> lr = adam_jax.inverse_sqrt_schedule(1.0, warmup_steps=100)
      >>> print([float(lr(t)) for t in (50, 100, 400)])
      [0.5, 1.0, 0.5]
    """
    validation.check_steps("warmup_steps", warmup_steps)
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps!r}")
    _check_values(peak_value=peak_value, init_value=init_value)

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        steps = _steps_as_float(count)
        decayed = peak_value * jnp.sqrt(warmup_steps / jnp.maximum(steps, warmup_steps))
        warming = _linear_ramp(steps, init_value, peak_value, warmup_steps)
        return jnp.where(steps < warmup_steps, warming, decayed)

    return schedule


def linear_warmup(
    schedule: optax.ScalarOrSchedule, warmup_steps: int, init_value: float = 0.0
) -> optax.Schedule:
    r"""Puts a linear warmup in front of any schedule (or constant).

    .. math::
        \alpha(t) = \begin{cases}
          \alpha_0 + (s(0) - \alpha_0)\, t / W & t < W \\
          s(t - W) & t \ge W
        \end{cases}

    Args:
      schedule: the schedule :math:`s` that follows the warmup, or a constant.
      warmup_steps: :math:`W \ge 0`.
      init_value: the rate at step 0.

    Returns:
      An ``optax.Schedule``.

    Example:
      >>> import adam_jax, optax
      >>> lr = adam_jax.linear_warmup(optax.exponential_decay(1.0, 1000, 0.5), 500)
      >>> print([float(lr(t)) for t in (250, 500, 1500)])
      [0.5, 1.0, 0.5]
    """
    validation.check_steps("warmup_steps", warmup_steps)
    _check_values(init_value=init_value)
    after = schedule if callable(schedule) else optax.constant_schedule(schedule)

    def warmed(count: jax.typing.ArrayLike) -> jax.Array:
        steps = _steps_as_float(count)
        start = after(jnp.zeros_like(jnp.asarray(count)))
        warming = _linear_ramp(steps, init_value, start, warmup_steps)
        following = after(jnp.maximum(jnp.asarray(count) - warmup_steps, 0))
        return jnp.where(steps < warmup_steps, warming, following)

    return warmed
