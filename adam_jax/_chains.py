"""Pieces that the aliases put around their moment estimates."""

from __future__ import annotations

import optax


def ascent(maximize: bool) -> tuple[optax.GradientTransformation, ...]:
    """The gradient negated first (PyTorch's ``maximize``: weight decay still shrinks the
    weights), or nothing."""
    return (optax.scale(-1.0),) if maximize else ()
