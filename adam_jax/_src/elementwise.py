"""Whether a function computes each element of its outputs from the same element of its
inputs alone: :func:`is_elementwise`, which tells the core whether a leaf's step may run on a
slice of its rows with the same values (:func:`adam_jax.step_in_slices`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

#: Primitives whose every output element is a function of the same element of each input, and
#: whose result is the same however XLA lays out the loop that computes it: correctly rounded
#: arithmetic, comparisons, selections and casts. Transcendental functions (exp, log, tanh,
#: atan2, pow...) are left out: XLA:CPU approximates them with vector code whose remainder
#: lanes may round otherwise, so a leaf cut into slices would not keep the whole leaf's values
#: bit for bit (adam_atan2's updates differed by one ulp on 5% of a 64 x 64 kernel's entries).
ELEMENTWISE = frozenset(
    {
        "abs", "add", "and", "ceil", "clamp", "convert_element_type", "copy", "copy_p", "div",
        "eq", "floor", "ge", "gt", "imag", "integer_pow", "is_finite", "le", "lt", "max", "min",
        "mul", "ne", "neg", "nextafter", "not", "or", "real", "reduce_precision", "rem",
        "round", "select_n", "sign", "sqrt", "square", "sub", "xor",
    }
)  # fmt: skip


def _sub_jaxprs(eqn: Any) -> list[Any]:
    """The jaxprs an equation calls (``pjit``'s, a custom derivative's function)."""
    found = []
    for value in eqn.params.values():
        jaxpr = getattr(value, "jaxpr", value)
        if hasattr(jaxpr, "eqns"):
            found.append(jaxpr)
    return found


def _elementwise_jaxpr(jaxpr: Any, shape: tuple[int, ...]) -> bool:
    """Whether every equation of ``jaxpr`` maps arrays of ``shape`` (and scalars) element by
    element; a scalar broadcast to ``shape`` is one."""
    for eqn in jaxpr.eqns:
        shapes = [tuple(getattr(v.aval, "shape", ())) for v in (*eqn.invars, *eqn.outvars)]
        if any(s not in ((), shape) for s in shapes):
            return False
        name = eqn.primitive.name
        if name == "broadcast_in_dim":
            if tuple(getattr(eqn.invars[0].aval, "shape", ())) != ():
                return False
        elif name not in ELEMENTWISE:
            subs = _sub_jaxprs(eqn)
            if not subs or not all(_elementwise_jaxpr(sub, shape) for sub in subs):
                return False
    return True


def is_elementwise(fn: Callable[..., Any], shape: tuple[int, ...], *args: Any) -> bool:
    """Whether ``fn(*args)`` (arrays of ``shape`` and scalars, concrete or abstract) computes
    each element of its outputs from the same element of its inputs alone: every primitive it
    runs is one of :data:`ELEMENTWISE`, or a scalar broadcast; no reduction, no random
    numbers, no shape of its own.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from adam_jax._src.elementwise import is_elementwise
      >>> x = jax.ShapeDtypeStruct((4, 3), jnp.float32)
      >>> print(is_elementwise(lambda g, m: m + 0.1 * (g - m), (4, 3), x, x),
      ...       is_elementwise(lambda g, m: g / jnp.sum(m), (4, 3), x, x))
      True False
    """
    return _elementwise_jaxpr(jax.make_jaxpr(fn)(*args).jaxpr, tuple(shape))
