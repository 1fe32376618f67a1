"""Where a stored moment goes: the shardings of its arrays, from its param's."""

from __future__ import annotations

from typing import Any

from jax.sharding import NamedSharding, PartitionSpec

from adam_jax._src.quantization.blocks import QuantizedArray, is_quantized, scale_sharding_for
from adam_jax._src.quantization.four_bit import (
    PackedQuantizedArray,
    Rank1QuantizedArray,
    tensor_shape,
)
from adam_jax._src.typed_sharding import placement_for_shape


def moment_sharding(stored: Any, param_sharding: Any) -> Any:
    """The sharding of one stored moment, from the sharding of its param.

    8-bit codes have the param's shape and take its sharding; 4-bit codes, and a 4-bit second
    moment's row and column maxima, take it on the axes it still divides. The block scales have
    the param's rank and take its sharding too, except on a blocked axis whose shards do not
    hold whole blocks (possible on Auto mesh axes, see the module docstring), which they keep
    whole. The
    scales' shape comes from ``stored``: derive it as the state will be made (on an Auto mesh,
    ``jax.eval_shape`` of ``init`` gives the layout of every ``init``). Derive the shardings of
    a whole state with ``optax.tree_map_params``::

      state_shardings = optax.tree_map_params(
          tx, quantization.moment_sharding, jax.eval_shape(tx.init, params), param_shardings,
          is_leaf=quantization.is_quantized,
          transform_non_params=lambda _: replicated,  # the step counts
      )

    Args:
      stored: a stored moment leaf (a :class:`QuantizedArray`, a 4-bit
        :class:`PackedQuantizedArray` or :class:`Rank1QuantizedArray`, or a plain array, or
        their ``jax.ShapeDtypeStruct``).
      param_sharding: the ``jax.sharding.NamedSharding`` of the corresponding param.

    Returns:
      ``param_sharding`` for a plain moment, or the stored form's NamedTuple of shardings.

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> from adam_jax import quantization
      >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
      >>> stored = quantization.BlockwiseQuantized().init(np.zeros((64, 512)))
      >>> sharding = quantization.moment_sharding(stored, NamedSharding(mesh, P("x")))
      >>> print(stored.absmax.shape, sharding.codes.spec, sharding.absmax.spec)
      (64, 2) P('x',) P('x', None)
    """
    if not is_quantized(stored):
        return param_sharding
    if isinstance(stored, Rank1QuantizedArray):
        return Rank1QuantizedArray(
            *(placement_for_shape(param_sharding, tuple(x.shape)) for x in stored)
        )
    if isinstance(stored, PackedQuantizedArray):
        shape = tensor_shape(stored)
        scale_shape = tuple(stored.absmax.shape)[: len(shape)]
        scales = scale_sharding_for(param_sharding, shape, scale_shape)
        if len(stored.absmax.shape) > len(shape):  # the odd marker axis
            scales = NamedSharding(scales.mesh, PartitionSpec(*scales.spec, None))
        codes = placement_for_shape(param_sharding, tuple(stored.codes.shape))
        return PackedQuantizedArray(codes=codes, absmax=scales)
    shape, scale_shape = tuple(stored.codes.shape), tuple(stored.absmax.shape)
    scales = scale_sharding_for(param_sharding, shape, scale_shape)
    return QuantizedArray(codes=param_sharding, absmax=scales)
