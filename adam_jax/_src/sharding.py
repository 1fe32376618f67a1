"""State shardings for sharded params and ZeRO-1: the implementation of
:mod:`adam_jax.sharding`."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from adam_jax._src.typed_sharding import spec_entries


def _mesh_axes(entry: Any) -> tuple[str, ...]:
    """The mesh axes of one entry of a ``PartitionSpec`` (None, a name or a tuple of names)."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def with_data_axis(
    sharding: NamedSharding, shape: tuple[int, ...], data_axis: str = "data"
) -> NamedSharding:
    """``sharding`` with the data axis added on one dimension of an array of ``shape``.

    The dimension is the first one that no mesh axis shards yet and whose size the data axis
    size divides (MaxText's ``add_data_to_sharding``, on free dimensions only). A
    sharding that already uses the data axis, or an array with no such dimension (a scalar, a
    short vector, a vector already sharded over another axis), keeps its sharding. The data
    axis never joins another axis on one dimension: under ``Explicit`` axes the update's
    arithmetic between a moment and its gradient (sharded as the param) would not type-check.

    Args:
      sharding: a ``NamedSharding`` on a mesh (or abstract mesh) that has ``data_axis``.
      shape: the shape of the array it shards.
      data_axis: the name of the mesh axis to add.

    Returns:
      A ``NamedSharding`` on the same mesh.

    Example:
      >>> from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P
      >>> from adam_jax._src.sharding import with_data_axis
      >>> mesh = AbstractMesh((4, 2), ("data", "model"))
      >>> print(with_data_axis(NamedSharding(mesh, P()), (6, 16)).spec)
      P(None, 'data')
      >>> print(with_data_axis(NamedSharding(mesh, P(None, "model")), (16, 8)).spec)
      P('data', 'model')
      >>> print(with_data_axis(NamedSharding(mesh, P("model")), (8,)).spec)
      P('model',)
      >>> print(with_data_axis(NamedSharding(mesh, P()), (3,)).spec)
      P()
    """
    mesh = sharding.mesh
    if data_axis not in mesh.axis_names:
        raise ValueError(f"data_axis {data_axis!r} is not an axis of the mesh {mesh.axis_names}")
    entries = spec_entries(sharding.spec, len(shape))
    if any(data_axis in _mesh_axes(entry) for entry in entries):
        return sharding
    data_size = mesh.shape[data_axis]
    for i, (dim, entry) in enumerate(zip(shape, entries, strict=True)):
        if entry is None and dim > 0 and dim % data_size == 0:
            spec = PartitionSpec(*entries[:i], data_axis, *entries[i + 1 :])
            return NamedSharding(mesh, spec, memory_kind=sharding.memory_kind)
    return sharding


def _dividing(
    spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh | AbstractMesh
) -> PartitionSpec:
    """``spec`` without the entries whose mesh axes do not divide their dimension of ``shape``."""
    entries = spec_entries(spec, len(shape))
    return PartitionSpec(
        *(
            entry if dim % math.prod(mesh.shape[axis] for axis in _mesh_axes(entry)) == 0 else None
            for dim, entry in zip(shape, entries, strict=True)
        )
    )


def _param_spec(param: Any, mesh: Mesh | AbstractMesh) -> PartitionSpec:
    """The ``PartitionSpec`` of a param on ``mesh``: its own where it has a ``NamedSharding``
    (entries on dimensions they do not divide dropped), else replicated."""
    sharding = getattr(param, "sharding", None)
    if sharding is None or not isinstance(sharding, NamedSharding):
        if sharding is not None and not sharding.is_fully_replicated:
            raise TypeError(
                f"params must be replicated or have a NamedSharding, got {type(sharding).__name__}"
            )
        return PartitionSpec()
    shape = np.shape(param)
    entries = spec_entries(sharding.spec, len(shape))
    for axis in {axis for entry in entries for axis in _mesh_axes(entry)}:
        if axis not in mesh.axis_names or sharding.mesh.shape[axis] != mesh.shape[axis]:
            raise ValueError(
                f"a param is sharded over mesh axis {axis!r} of size "
                f"{sharding.mesh.shape[axis]}, which the mesh {dict(mesh.shape)} does not have"
            )
    return _dividing(sharding.spec, shape, mesh)


def state_shardings(
    tx: optax.GradientTransformation,
    params: Any,
    mesh: Mesh | AbstractMesh,
    data_axis: str = "data",
) -> Any:
    """The ZeRO-1 shardings of ``tx``'s state: each leaf sharded over the data axis too.

    A state leaf starts from the sharding JAX gives it in ``tx.init`` (traced abstractly, with
    the mesh's axes explicit, so each moment gets its param's sharding, and the step counts
    and hyperparameters none), keeps the axes of it that divide its dimensions in the state
    that ``init`` makes from ``params`` on ``mesh``, and gets the data axis added by
    :func:`with_data_axis`. The leaves are placed by their own shapes, so stored forms whose
    leaves differ from the param (the 8-bit codes and block scales) are handled alike.

    Args:
      tx: the optimizer.
      params: the params tree: arrays or ``jax.ShapeDtypeStruct`` s, each with a
        ``NamedSharding`` on ``mesh`` (FSDP, tensor parallelism) or replicated (no sharding).
        A mesh axis that does not divide the dimension it shards is not carried over to the
        state.
      mesh: the device mesh (a ``jax.sharding.Mesh``, or an ``AbstractMesh``); ``Explicit``
        and ``Auto`` axes alike.
      data_axis: the name of the data-parallel axis of ``mesh``.

    Returns:
      A pytree of ``NamedSharding`` with the structure of ``tx.init(params)``: the
      ``out_shardings`` of the jitted ``init`` and of the train step's state.

    Example:
      >>> import jax, numpy as np, adam_jax
      >>> from jax.sharding import Mesh
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
      >>> params = {"w": np.zeros((16, 4), np.float32), "scale": np.ones(3, np.float32)}
      >>> tx = adam_jax.adam(1e-3)
      >>> shardings = adam_jax.sharding.state_shardings(tx, params, mesh)
      >>> print(shardings[0].mu["w"].spec, shardings[0].count.spec)
      P('data', None) P()
      >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
      >>> print(state[0].nu["w"].sharding == shardings[0].nu["w"])
      True
    """
    if data_axis not in mesh.axis_names:
        raise ValueError(f"data_axis {data_axis!r} is not an axis of the mesh {mesh.axis_names}")
    explicit = mesh.abstract_mesh.update_axis_types(
        {axis: AxisType.Explicit for axis in mesh.axis_names}
    )

    def abstract_param(param: Any) -> jax.ShapeDtypeStruct:
        sharding = NamedSharding(explicit, _param_spec(param, mesh))
        dtype = param.dtype if hasattr(param, "dtype") else jax.numpy.result_type(param)
        return jax.ShapeDtypeStruct(np.shape(param), dtype, sharding=sharding)

    with jax.sharding.use_abstract_mesh(explicit):
        # Traced rather than eval_shape'd: the types tell the memory too (host memory for
        # adam_jax.offload_state's state).
        typed_state = jax.jit(tx.init).trace(jax.tree.map(abstract_param, params)).out_avals
    # The shapes of the state that init makes from these params on this mesh: a stored form
    # may lay itself out by the params' shardings on Explicit axes only (the 8-bit scales).
    state = jax.eval_shape(tx.init, params)

    def leaf_sharding(leaf: jax.ShapeDtypeStruct, typed: Any) -> NamedSharding:
        spec = typed.sharding.spec if isinstance(typed.sharding, NamedSharding) else None
        if spec is None or len(typed.shape) != len(leaf.shape):
            spec = PartitionSpec()
        spec = _dividing(spec, leaf.shape, mesh)
        sharding = with_data_axis(NamedSharding(mesh, spec), leaf.shape, data_axis)
        if typed.memory_space == jax.memory.Space.Host:
            return sharding.with_memory_kind("pinned_host")
        return sharding

    return jax.tree.map(leaf_sharding, state, typed_state)
