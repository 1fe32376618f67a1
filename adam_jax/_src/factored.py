"""Factored second moments: a matrix's moment kept as its row and column means (Adafactor)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax._src.numerics import compute_dtype
from adam_jax._src.storage import MomentStorage, same_container
from adam_jax._src.typed_sharding import (
    place_like,
    placement_for_shape,
    placement_of,
    without_axes_of,
)


class FactoredMoment(NamedTuple):
    """A moment of a leaf with two large axes, as the means over each of them.

    Attributes:
      row: the mean over the second largest axis (that axis kept with extent 1).
      col: the mean over the largest axis (likewise).
    """

    row: jax.Array
    col: jax.Array


def _is_factored(stored: Any) -> bool:
    """A :class:`FactoredMoment`, or a mapping of its fields (as ``flax.nnx.Optimizer`` keeps
    it), rather than a whole moment."""
    return hasattr(stored, "row") and hasattr(stored, "col")


def _axes(stored: Any) -> tuple[int, int]:
    """``(d0, d1)``: the largest axis (averaged in ``col``) and the second (in ``row``)."""
    pairs = list(enumerate(zip(stored.row.shape, stored.col.shape, strict=True)))
    d1 = next(i for i, (r, c) in pairs if r < c)
    d0 = next(i for i, (r, c) in pairs if c < r)
    return d0, d1


@dataclasses.dataclass(frozen=True)
class FactoredStorage(MomentStorage):
    r"""Keeps a non-negative moment of a leaf with two axes of at least
    ``min_dim_size_to_factor`` as its means over each of them, and the others whole.

    With :math:`d_0` the largest axis and :math:`d_1` the second largest (as
    ``optax.scale_by_factored_rms`` chooses), the stored factors of :math:`V` are
    :math:`R = \operatorname{mean}_{d_1} V` and :math:`C = \operatorname{mean}_{d_0} V`, and
    the moment is reconstructed as :math:`\hat V = R\, C / \operatorname{mean}_{d_0} R`
    (Shazeer and Stern, 2018). The row mean of the reconstruction is :math:`R` again, so the
    factored average :math:`\beta_2 \hat V + (1-\beta_2) g^2` has the factors
    :math:`\beta_2 R + (1-\beta_2) \operatorname{mean}_{d_1} g^2`: Adafactor's accumulators. A
    reducing storage: the step uses the reconstruction of the new factors
    (:meth:`adam_jax.rules.Leaf.settle`). An ``(n, m)`` matrix keeps ``n + m`` values instead of
    ``n m``. On :class:`adam_jax.FlatParams` the core applies it to each packed tensor in its
    shape, so the matrices of a buffer are factored as on the tree.

    Attributes:
      min_dim_size_to_factor: the smallest extent of both factored axes, >= 2.
      dtype: the factors' dtype (``None``: the param's, at least float32).
    """

    min_dim_size_to_factor: int = 128
    dtype: Any = None

    reduces = True

    def __post_init__(self) -> None:
        size = self.min_dim_size_to_factor
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ValueError(f"min_dim_size_to_factor must be an integer >= 2, got {size!r}")

    def factored_axes(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """``(d0, d1)``, the largest axis and the second largest, or None when the second
        largest is shorter than ``min_dim_size_to_factor`` (the moment is kept whole)."""
        if len(shape) < 2:
            return None
        order = np.argsort(shape, kind="stable")
        if shape[order[-2]] < self.min_dim_size_to_factor:
            return None
        return int(order[-1]), int(order[-2])

    def init(self, param: Any) -> Any:
        shape = tuple(param.shape)
        dtype = compute_dtype(param.dtype) if self.dtype is None else self.dtype
        placement = placement_of(param)
        axes = self.factored_axes(shape)
        if axes is None:
            return jax.lax.full(shape, 0, dtype, sharding=placement)
        d0, d1 = axes
        row_shape = tuple(1 if i == d1 else n for i, n in enumerate(shape))
        col_shape = tuple(1 if i == d0 else n for i, n in enumerate(shape))
        return FactoredMoment(
            row=jax.lax.full(
                row_shape, 0, dtype, sharding=placement_for_shape(placement, row_shape)
            ),
            col=jax.lax.full(
                col_shape, 0, dtype, sharding=placement_for_shape(placement, col_shape)
            ),
        )

    def load(self, stored: Any) -> jax.Array:
        if not _is_factored(stored):
            return stored
        d0, _ = _axes(stored)
        row, col = stored.row, without_axes_of(stored.col, stored.row)
        mean = jnp.mean(row, axis=d0, keepdims=True)
        # An all-zero history (no gradient yet) has zero means: its moment is 0, not 0 / 0.
        safe = jnp.where(mean == 0, jnp.ones_like(mean), mean)
        return row * (col / safe)

    def store(self, value: jax.Array, stored: Any) -> Any:
        if not _is_factored(stored):
            return place_like(value.astype(stored.dtype), stored)
        factors = self._factors(value, stored)
        return same_container(
            stored,
            FactoredMoment(
                row=place_like(factors.row.astype(stored.row.dtype), stored.row),
                col=place_like(factors.col.astype(stored.col.dtype), stored.col),
            ),
        )

    def project(self, value: jax.Array, stored: Any) -> jax.Array:
        if not _is_factored(stored):
            return value
        return self.load(self._factors(value, stored))

    @staticmethod
    def _factors(value: jax.Array, stored: Any) -> FactoredMoment:
        d0, d1 = _axes(stored)
        return FactoredMoment(
            row=jnp.mean(value, axis=d1, keepdims=True), col=jnp.mean(value, axis=d0, keepdims=True)
        )


def factored_second_moment(min_dim_size_to_factor: int = 128, dtype: Any = None) -> FactoredStorage:
    """A :class:`FactoredStorage` for a second moment (``nu_dtype``): row and column means for
    leaves with two axes of at least ``min_dim_size_to_factor``, the whole moment for the rest.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.adam(1e-3, nu_dtype=adam_jax.factored_second_moment(4))
      >>> state = tx.init({"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)})
      >>> nu = state[0].nu
      >>> print(nu["w"].row.shape, nu["w"].col.shape, nu["b"].shape)  # 12 values for 32
      (8, 1) (1, 4) (4,)
    """
    return FactoredStorage(min_dim_size_to_factor, dtype)
