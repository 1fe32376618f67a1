"""Construction-time checks of hyperparameters.

Only concrete values are checked: traced values (under ``jit`` or ``vmap``) and schedules pass
through untouched, so batching or differentiating over hyperparameters keeps working.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def static_float(value: Any) -> float | None:
    """Returns ``value`` as a Python float when it is a concrete real scalar, else ``None``."""
    if isinstance(value, jax.core.Tracer) or callable(value):
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape == () and dtype is not None and jnp.issubdtype(dtype, jnp.floating):
        return float(value)
    if shape == () and dtype is not None and jnp.issubdtype(dtype, jnp.integer):
        return float(value)
    return None


def check_non_negative(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless a concrete ``value`` is finite and >= 0."""
    number = static_float(value)
    if number is not None and not (math.isfinite(number) and number >= 0.0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless a concrete ``value`` is finite and > 0."""
    number = static_float(value)
    if number is not None and not (math.isfinite(number) and number > 0.0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def check_at_least(name: str, value: Any, lower: float) -> None:
    """Raises ``ValueError`` unless a concrete ``value`` is finite and >= ``lower``."""
    number = static_float(value)
    if number is not None and not (math.isfinite(number) and number >= lower):
        raise ValueError(f"{name} must be finite and >= {lower:g}, got {value!r}")


def check_decay(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless a concrete decay rate ``value`` lies in [0, 1).

    Exactly 1 is let through only where rounding makes it: in an array of a dtype narrower than
    float32, as 0.999 becomes in bfloat16 when ``optax.inject_hyperparams`` casts it to the
    params' dtype (the transformations take the b -> 1 limit there). Traced values are not
    checked.
    """
    number = static_float(value)
    if number is None:
        return
    dtype = getattr(value, "dtype", None)
    rounded_up = (
        number == 1.0
        and dtype is not None
        and jnp.issubdtype(dtype, jnp.floating)
        and jnp.finfo(dtype).bits < 32
    )
    if not (0.0 <= number < 1.0 or rounded_up):
        raise ValueError(
            f"{name} must be in [0, 1) (exactly 1 only as a bfloat16 or float16 rounding), "
            f"got {value!r}"
        )


def check_steps(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value`` is a whole number of steps >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def check_integer(name: str, value: Any, lower: int) -> None:
    """Raises ``ValueError`` unless a concrete ``value`` is a whole number >= ``lower`` (an
    array of one too: ``optax.inject_hyperparams`` injects numbers as arrays)."""
    number = static_float(value)
    if isinstance(value, bool) or (
        number is not None
        and not (math.isfinite(number) and number >= lower and number == int(number))
    ):
        raise ValueError(f"{name} must be an integer >= {lower}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


#: The check each conventional hyperparameter name gets from :func:`check_hyperparams`.
_CHECKS_BY_NAME = {
    "b1": check_decay,
    "b2": check_decay,
    "b3": check_decay,
    "alpha": check_non_negative,
    "eps": check_non_negative,
    "eps_root": check_non_negative,
    "weight_decay": check_non_negative,
}


def check_hyperparams(**values: Any) -> None:
    """Checks hyperparameters by their conventional names: decay rates ``b1``, ``b2``, ``b3``
    in [0, 1) (see :func:`check_decay`); ``alpha``, ``eps``, ``eps_root`` and ``weight_decay``
    finite and >= 0. Schedules (callables) and traced values pass, as in the single checks.

    Raises:
      ValueError: naming the first value out of its range.
      TypeError: for a name without a conventional check (use the single checks for it).
    """
    for name, value in values.items():
        if name not in _CHECKS_BY_NAME:
            raise TypeError(
                f"check_hyperparams knows {sorted(_CHECKS_BY_NAME)}, got {name!r}: "
                "check it with check_decay, check_non_negative, ..."
            )
        _CHECKS_BY_NAME[name](name, value)
