"""How optimizer moments are stored between steps.

The transformations compute in at least float32 and hand each new moment to a
:class:`MomentStorage`, which decides its stored form: a plain cast (:func:`cast_storage`, the
default) or a compressed encoding such as 8-bit block-wise quantization. The stored form of one
leaf may itself be a pytree; the moment trees then have the params tree as a prefix.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


class MomentStorage(abc.ABC):
    """The stored form of one moment leaf.

    Subclass it to store moments in a form of your own; any class works (it need not be
    hashable or frozen), since the transformations only call its three methods.

    Example:
      >>> import dataclasses, adam_jax, jax.numpy as jnp
      >>> @dataclasses.dataclass
      ... class Float16(adam_jax.MomentStorage):
      ...     def init(self, param):
      ...         return jnp.zeros(param.shape, jnp.float16)
      ...     def load(self, stored):
      ...         return stored
      ...     def store(self, value, stored):
      ...         return value.astype(stored.dtype)
      >>> tx = adam_jax.adam(1e-3, nu_dtype=Float16())
      >>> _, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
      >>> print(state[0].nu.dtype, state[0].nu)
      float16 [0.001 0.001]
    """

    @abc.abstractmethod
    def init(self, param: Any) -> Any:
        """Returns the stored zeros for a leaf shaped like ``param`` (array or ShapeDtypeStruct)."""

    @abc.abstractmethod
    def load(self, stored: Any) -> jax.Array:
        """Returns the moment held in ``stored`` as an array."""

    @abc.abstractmethod
    def store(self, value: jax.Array, stored: Any) -> Any:
        """Encodes ``value`` into a stored form with the same structure, shapes and dtypes as
        ``stored``."""


@dataclasses.dataclass(frozen=True)
class CastStorage(MomentStorage):
    """Stores a moment as a plain array of ``dtype`` (the param's own dtype when ``None``).

    Example:
      >>> import jax.numpy as jnp
      >>> from adam_jax import CastStorage
      >>> print(CastStorage(jnp.bfloat16).init(jnp.zeros(3, jnp.float32)).dtype)
      bfloat16
    """

    dtype: Any = None

    def init(self, param: Any) -> jax.Array:
        dtype = param.dtype if self.dtype is None else self.dtype
        if isinstance(param, jax.Array):
            return jnp.zeros_like(param, dtype=dtype)
        return jnp.zeros(param.shape, dtype, device=getattr(param, "sharding", None))

    def load(self, stored: jax.Array) -> jax.Array:
        return stored

    def store(self, value: jax.Array, stored: jax.Array) -> jax.Array:
        return value.astype(stored.dtype)


def cast_storage(dtype: Any = None) -> CastStorage:
    """Storage as a plain array of ``dtype`` (e.g. ``jnp.bfloat16`` halves the state).

    Args:
      dtype: the stored dtype, or ``None`` for the param's own.

    Returns:
      A :class:`CastStorage`.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.adam(1e-3, mu_dtype=adam_jax.cast_storage(jnp.bfloat16))
      >>> print(tx.init(jnp.zeros(4))[0].mu.dtype)
      bfloat16
    """
    return CastStorage(None if dtype is None else jnp.dtype(dtype))


def as_storage(spec: Any) -> MomentStorage:
    """Accepts ``None``, a dtype or a :class:`MomentStorage` (as ``mu_dtype`` / ``nu_dtype``)."""
    if isinstance(spec, MomentStorage):
        return spec
    try:
        return cast_storage(spec)
    except TypeError as error:
        raise ValueError(
            f"moment dtype must be None, a dtype or a MomentStorage, got {spec!r}"
        ) from error


def real_part_of(param: Any) -> Any:
    """``param`` itself, or a same-shaped real stand-in when it is complex (second moments are
    real)."""
    if jnp.issubdtype(param.dtype, jnp.complexfloating):
        dtype = jnp.finfo(param.dtype).dtype
        traced = isinstance(param, jax.core.Tracer)
        # An uncommitted param (the default device) gets an uncommitted moment: a committed one
        # would make the first jitted step's outputs committed, and the second call recompile.
        committed = not traced and getattr(param, "committed", True)
        sharding = getattr(param, "sharding", None) if committed else None
        return jax.ShapeDtypeStruct(param.shape, dtype, sharding=sharding)
    return param
