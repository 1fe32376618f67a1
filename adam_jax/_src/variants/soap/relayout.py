"""SOAP's state re-laid for another number of devices (:func:`relayout_soap_state`): with
``block_axis`` the factor and basis vectors are laid out per device (:class:`SoapLayout`), so a
run resumed on another count takes its blocks' values in the new order."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from adam_jax._src.variants.soap.layout import SoapLayout
from adam_jax._src.variants.soap.rule import _MAX_PRECOND_DIM, ScaleBySoapState
from adam_jax._src.variants.soap.stacks import StackedSoapState, StackPlan

# The state's fields that are laid out by device, and what they hold (for the messages).
_FIELDS = {"gg": "factors", "q": "bases"}


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def relayout_soap_state(
    state: Any,
    params: Any,
    *,
    devices_from: int,
    devices_to: int,
    block_size: int,
    max_precond_dim: int | None = None,
    merge_dims: bool = False,
    precondition_1d: bool = False,
) -> Any:
    r"""Re-lays SOAP's factors and bases, spread over ``devices_from`` devices, for
    ``devices_to``: a run resumed on another number of devices.

    With ``block_axis`` (:func:`scale_by_soap`), each leaf's factors ``gg`` and bases ``q`` are
    one flat vector laid out per device: device after device, each holding the slots of every
    group of blocks of one shape, block :math:`k` of a group of :math:`n` in slot
    :math:`k \bmod s` of device :math:`\lfloor k / s \rfloor`, with :math:`s = \lceil n /
    \mathrm{devices} \rceil` slots a device (the last devices' last slots empty, zeros, where
    the count does not divide :math:`n`; a leaf of one block is kept whole). The vector's
    length and order depend on the count; this moves each block's matrices, unchanged, to
    their places for ``devices_to`` (a permutation of the blocks' values, the empty slots
    zero), so that SOAP stepped on ``devices_to`` devices from the result takes the updates
    it would have taken on ``devices_from``. The other fields (Adam's moments, the count)
    are not laid out by device and are returned as they are. With ``stack_blocks``, each stack
    (the blocks of one shape from every leaf) holds a batch of matrices a dimension, block
    :math:`k` at index :math:`k` on any count: it keeps its blocks, with as many empty slots
    after them as the new count leaves.

    Runs on the host, once at a resume: the vectors are read as NumPy arrays (a
    ``jax.Array`` must be fully addressable: read it replicated, or to the host, where it
    spans several processes) and returned so, in their dtype (float32, or ``bfloat16`` of
    ``factor_dtype`` / ``basis_dtype``, re-laid exactly); the caller places them (on the new
    mesh, ``jax.device_put`` with the state's shardings there). Factors or bases stored as
    8-bit or 4-bit codes cannot be re-laid exactly (a block of codes shares its scale across
    SOAP's blocks): such a state is refused.

    Args:
      state: an optimizer state holding one or more ``ScaleBySoapState`` (of
        :func:`soap` or :func:`scale_by_soap`, alone or inside a chain, a tuple, a dict...),
        written with the blocks spread over ``devices_from`` devices.
      params: the params (arrays or ``jax.ShapeDtypeStruct``; only their shapes are read), of
        the tree the state was initialized for.
      devices_from: the devices the state's blocks are spread over (the size of
        ``block_axis`` on the mesh that wrote it; 1 for a state without ``block_axis``), an
        integer >= 1.
      devices_to: the devices to spread them over, an integer >= 1.
      block_size: SOAP's ``block_size``, an integer >= 1.
      max_precond_dim: SOAP's ``max_precond_dim``, an integer >= 1; ``None`` (its default)
        is the authors' 10000.
      merge_dims: SOAP's ``merge_dims``.
      precondition_1d: SOAP's ``precondition_1d``.

    Returns:
      ``state`` with the fields ``gg`` and ``q`` of each ``ScaleBySoapState`` re-laid
      for ``devices_to`` devices: per leaf a NumPy vector of the layout's size there, in the
      stored dtype.

    Raises:
      ValueError: for a count or an option out of range, a state that holds no
        ``ScaleBySoapState``, a vector whose length is not its leaf's for
        ``devices_from`` (the options differ from the run's that wrote it: the message names
        the leaf, the length found and the one expected), or factors or bases stored as
        8-bit or 4-bit codes.

    Example:
      >>> import adam_jax, jax.numpy as jnp, numpy as np
      >>> params = {"w": jnp.ones((24, 16))}  # 3 x 2 blocks of 8 x 8, 128 values each
      >>> tx = adam_jax.soap(1e-3, block_size=8)
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.arange(384.0).reshape(24, 16)}, state, params)
      >>> spread = adam_jax.relayout_soap_state(
      ...     state, params, devices_from=1, devices_to=4, block_size=8
      ... )
      >>> print(state[0].q["w"].shape, spread[0].q["w"].shape)  # 4 devices of 2 slots
      (768,) (1024,)
      >>> back = adam_jax.relayout_soap_state(
      ...     spread, params, devices_from=4, devices_to=1, block_size=8
      ... )
      >>> print(np.array_equal(back[0].q["w"], state[0].q["w"]))
      True
    """
    _check_count("devices_from", devices_from)
    _check_count("devices_to", devices_to)
    _check_count("block_size", block_size)
    if max_precond_dim is not None:
        _check_count("max_precond_dim", max_precond_dim)
    layout = SoapLayout(
        max_precond_dim=_MAX_PRECOND_DIM if max_precond_dim is None else max_precond_dim,
        merge_dims=merge_dims,
        precondition_1d=precondition_1d,
        block_size=block_size,
    )
    source, target = layout.on_devices(devices_from), layout.on_devices(devices_to)
    stacked_source, stacked_target = (
        dataclasses.replace(x, stacked=True) for x in (source, target)
    )
    found = 0

    def check_plain(what: str, stored: Any) -> None:
        if not isinstance(stored, np.ndarray | jax.Array):
            raise ValueError(
                f"relayout_soap_state: {what} are stored as {type(stored).__name__} (8-bit or "
                "4-bit codes of factor_dtype or basis_dtype), whose blocks of codes share "
                "their scales across SOAP's blocks: they cannot be re-laid exactly. Resume on "
                f"the same number of devices ({devices_from}), or store them as float32 or "
                "bfloat16"
            )

    def relaid_vector(field: str, path: Any, param: Any, stored: Any) -> Any:
        if not jax.tree.leaves(stored):  # a masked leaf (optax.masked's MaskedNode), or None
            return stored
        name = jax.tree_util.keystr(path) or "(the root)"
        what = f"the {_FIELDS[field]} ({field}) of leaf {name}"
        check_plain(what, stored)
        shape = tuple(param.shape)
        expected = source.size(shape)
        if stored.shape != (expected,):
            length = f"{stored.shape[0]} values" if stored.ndim == 1 else f"shape {stored.shape}"
            raise ValueError(
                f"relayout_soap_state: {what} (shape {shape}) are a vector of {length}, where "
                f"spread over devices_from={devices_from} devices they are {expected} values "
                f"(block_size={block_size}, max_precond_dim={layout.max_precond_dim}, "
                f"merge_dims={merge_dims}, precondition_1d={precondition_1d}): give the "
                "devices and options of the run that wrote the state"
            )
        vector = np.asarray(stored)
        return target.pack_blocks(source.unpack_blocks(vector, shape), shape, vector.dtype)

    def relaid_matrices(field: str, name: str, shape: tuple[int, ...], stored: Any) -> Any:
        """A stack's batches of matrices (one a dimension), block ``k`` at index ``k`` on any
        count: its blocks kept, the empty slots after them as many zeros as the new count
        leaves."""
        (old_devices, (old_slots,)), (new_devices, (new_slots,)) = (
            laid.placement(shape) for laid in (stacked_source, stacked_target)
        )
        n, relaid = shape[0], {}
        for key, part in stored.items():
            what = f"the {_FIELDS[field]} ({field}) of stack {name!r}, {key}"
            check_plain(what, part)
            expected = old_devices * old_slots
            if part.ndim != 3 or part.shape[0] != expected:
                raise ValueError(
                    f"relayout_soap_state: {what} (blocks {shape[1:]}) are of shape "
                    f"{part.shape}, where spread over devices_from={devices_from} devices they "
                    f"are a batch of {expected} matrices (block_size={block_size}): give the "
                    "devices and options of the run that wrote the state"
                )
            kept = np.asarray(part)[:n]
            empty = np.zeros((new_devices * new_slots - n, *kept.shape[1:]), kept.dtype)
            relaid[key] = np.concatenate([kept, empty])
        return relaid

    def relaid_stacks(node: StackedSoapState) -> StackedSoapState:
        """A stacked state's stacks, each stack's batches keeping its blocks in order."""
        shapes = StackPlan.of(jax.tree.leaves(params), layout).stack_shapes()
        fields: dict[str, Any] = {}
        for field in _FIELDS:
            fields[field] = {
                name: relaid_matrices(field, name, shapes[name], stored)
                for name, stored in getattr(node.stacks, field).items()
            }
        return node._replace(stacks=node.stacks._replace(**fields))

    def relaid(node: Any) -> Any:
        nonlocal found
        if isinstance(node, StackedSoapState):
            found += 1
            return relaid_stacks(node)
        if not isinstance(node, ScaleBySoapState):
            return node
        found += 1
        fields: dict[str, Any] = {
            field: jax.tree_util.tree_map_with_path(
                lambda path, p, s, f=field: relaid_vector(f, path, p, s),
                params,
                getattr(node, field),
            )
            for field in _FIELDS
        }
        return node._replace(**fields)

    def is_soap_state(node: Any) -> bool:
        return isinstance(node, ScaleBySoapState | StackedSoapState)

    out = jax.tree.map(relaid, state, is_leaf=is_soap_state)
    if not found:
        raise ValueError(
            "relayout_soap_state: the state holds no ScaleBySoapState (the state of soap or "
            "scale_by_soap); give the optimizer's state as its init and update return it"
        )
    return out
