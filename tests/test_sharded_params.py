"""Every transformation on params sharded with ``NamedSharding``, on Explicit and Auto meshes.

On 8 host devices (``XLA_FLAGS`` in conftest): every alias (the modern Adam family of
``tests/variants.py`` included), bfloat16 and 8-bit moment storage,
weight-decay masks, learning-rate schedules and ``FlatParams``, on params sharded over their
last axis and over their rows (on a 1-D mesh of 8, and over both axes of a 2 x 4 mesh). For
each, eagerly and under ``jit``:

* ``init`` and two ``update`` s run, and every state leaf of a sharded param is sharded like
  it: each device holds the same fraction of it (``1/8`` here), 8-bit codes and block scales
  alike.
* The updates and states equal those of the same steps run on one device from the same
  initial state (float32 rounding; 8-bit: the very same codes and scales).
* ``jax.typeof`` of every state leaf is the same after ``init``, ``update`` and their jitted
  versions, as in optax's own sharding test (on Auto meshes, where ``jit`` cannot see the
  params' sharding, the jitted ``init`` takes ``out_shardings``).

A last axis split over Explicit mesh axes into shards that do not hold whole default blocks gets
shorter 8-bit blocks, one set per shard; on Auto axes, which array types do not carry, the
layout stays the default one and the scales keep that axis whole (see adam_jax.quantization).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from variants import VARIANTS

import adam_jax
from adam_jax import flat, quantization

DEVICES = 8

if jax.device_count() < DEVICES:
    pytest.skip(
        "needs 8 host devices (XLA_FLAGS set in conftest before jax import)",
        allow_module_level=True,
    )

AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
SCHEDULE = optax.linear_schedule(1e-2, 1e-3, 4)


def _matrices(params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim > 1, params)


OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam": lambda: adam_jax.adam(1e-2),
    "adamw": lambda: adam_jax.adamw(SCHEDULE, weight_decay=0.1, mask=_matrices),
    "adam_l2": lambda: adam_jax.adam_l2(1e-2, weight_decay=0.1),
    "nadam": lambda: adam_jax.nadam(1e-2),
    "nadamw": lambda: adam_jax.nadamw(1e-2, weight_decay=0.1),
    "amsgrad": lambda: adam_jax.amsgrad(SCHEDULE),
    "adamax": lambda: adam_jax.adamax(1e-2),
    "adamaxw": lambda: adam_jax.adamaxw(1e-2, weight_decay=0.1),
    "adam_bf16": lambda: adam_jax.adam(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
    "adam_8bit": lambda: adam_jax.adam_8bit(1e-2),
    "adamw_8bit": lambda: adam_jax.adamw_8bit(SCHEDULE, weight_decay=0.1, mask=_matrices),
    # The modern Adam family, with weight decay on the matrices where the variant has it.
    **{v.name: functools.partial(v.make_decaying, _matrices) for v in VARIANTS},
}

# A last axis split in shards of 256 (whole default blocks) and rows split (a short last axis:
# 8-bit blocks of 4 rows); on the 2-D mesh also a small vector kept whole (float32 moments even
# in 8 bits).
Specs = Mapping[str, tuple[tuple[int, ...], P]]
SPECS: dict[str, Specs] = {
    "1d": {"w": ((32, 2048), P(None, "x")), "v": ((512, 64), P("x"))},
    "2d": {"w": ((32, 2048), P("x", "y")), "v": ((512, 64), P(("x", "y"))), "b": ((24,), P())},
}


def _mesh(axis_type: str, shape: tuple[int, ...] = (DEVICES,)) -> Mesh:
    names = ("x", "y")[: len(shape)]
    return jax.make_mesh(shape, names, axis_types=(AXIS_TYPES[axis_type],) * len(shape))


@contextlib.contextmanager
def _on(mesh: Mesh) -> Iterator[None]:
    """Jitted code on Explicit meshes whose outputs do not depend on its inputs (``init``) needs
    the mesh as context, as in JAX generally; Auto meshes need none."""
    if mesh.axis_types[0] == AxisType.Explicit:
        with jax.set_mesh(mesh):
            yield
    else:
        yield


def _problem(specs: Specs) -> tuple[Any, list[Any]]:
    """Params and two gradients, on one device."""
    rng = np.random.default_rng(0)

    def draw(shape: tuple[int, ...]) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    params = {k: draw(shape) for k, (shape, _) in specs.items()}
    return params, [jax.tree.map(lambda p: draw(p.shape), params) for _ in range(2)]


def _shardings(specs: Specs, mesh: Mesh) -> dict[str, Any]:
    return {k: NamedSharding(mesh, spec) for k, (_, spec) in specs.items()}


def _steps(tx: optax.GradientTransformation, state: Any, params: Any, grads: Any, jitted: bool):
    update = jax.jit(tx.update) if jitted else tx.update
    updates, states = [], [state]
    for g in grads:
        u, state = update(g, state, params)
        updates.append(u)
        states.append(state)
    return updates, states


def _on_one_device(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)


@functools.cache
def _optimizer(name: str) -> optax.GradientTransformation:
    """One instance per name, so that its jitted functions compile once for all meshes."""
    return OPTIMIZERS[name]()


def _reference(
    tx: optax.GradientTransformation, state: Any, params: Any, grads: Any, eager: bool = True
) -> Any:
    """The same steps on one device: two jitted ones and, to compare with the eager steps
    (whose roundings differ: no fused multiply-adds), one eager one."""
    state, params, grads = _on_one_device((state, params, grads))
    jitted = _steps(tx, state, params, grads, jitted=True)
    return jitted, _steps(tx, state, params, grads[:1], jitted=False) if eager else None


@functools.cache
def _one_device_run(name: str, specs: str) -> Any:
    """:func:`_reference` from ``init`` on one device, once for both mesh types."""
    params, grads = _problem(SPECS[specs])
    tx = _optimizer(name)
    return _reference(tx, tx.init(params), params, grads)


def _params_like(tree: Any, params: Any) -> list[Any]:
    """The subtrees of a state shaped like ``params`` (moments; an 8-bit moment is one leaf)."""
    structure: Any = jax.tree.structure(tree, is_leaf=quantization.is_quantized)  # untyped stubs
    if structure == jax.tree.structure(params):
        return [tree]
    children = jax.tree.leaves(tree, is_leaf=lambda node: node is not tree)
    if children == [tree]:
        return []
    return [found for child in children for found in _params_like(child, params)]


def _assert_state_sharded_like_params(state: Any, params: Any) -> None:
    """Every array of a stored moment is split like its param: each device holds the same
    fraction of it as of the param (8-bit codes and scales alike). A reduced moment (block
    means, factors) keeps the param's split of the axes it keeps whole."""
    moments = _params_like(state, params)
    assert moments
    for tree in moments:
        stored_leaves = jax.tree.leaves(tree, is_leaf=quantization.is_quantized)
        for stored, param in zip(stored_leaves, jax.tree.leaves(params), strict=True):
            for leaf in jax.tree.leaves(stored):
                sizes = {shard.data.size for shard in leaf.addressable_shards}
                fraction = _kept_fraction(param, leaf, quantization.is_quantized(stored))
                assert sizes == {leaf.size * fraction}, (leaf.shape, leaf.sharding, param.sharding)


def _kept_fraction(param: jax.Array, leaf: jax.Array, quantized: bool) -> float:
    """The fraction of ``leaf`` one device holds when it is split like ``param`` on the axes it
    keeps whole (all of them, except for a reduced moment's axes of extent 1). A stored form of
    another rank (SOAP's flattened Kronecker factors and bases) is kept whole on every device."""
    if not quantized and leaf.ndim != param.ndim:
        return 1.0
    if quantized or leaf.shape == param.shape:
        return param.addressable_shards[0].data.size / param.size
    shard = param.sharding.shard_shape(param.shape)
    ways = 1
    for kept, whole, part in zip(leaf.shape, param.shape, shard, strict=True):
        ways *= whole // part if kept == whole else 1
    return 1 / ways


def _assert_close(actual: Any, expected: Any) -> None:
    """Float32 rounding for float leaves; 8-bit codes (integers) exactly."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        if np.issubdtype(e.dtype, np.integer):
            np.testing.assert_array_equal(a, e)
        else:
            np.testing.assert_allclose(a.astype(np.float32), e.astype(np.float32), 2e-6, 1e-7)


def _entries(spec: P, ndim: int) -> tuple[Any, ...]:
    """The entries of ``spec`` for every axis of an ``ndim`` array (trailing ones unsharded)."""
    return tuple(spec) + (None,) * (ndim - len(spec))


def _types(state: Any, params: Any, explicit: bool) -> tuple[Any, list[Any]]:
    """The structure and ``jax.typeof`` of every leaf of the state; on Auto meshes of the
    moments only (a step count made by ``init`` lives on the default device until a jitted
    update puts it on the mesh)."""
    tree = state if explicit else _params_like(state, params)
    return jax.tree.structure(tree), [jax.typeof(x) for x in jax.tree.leaves(tree)]


def _check(
    tx: optax.GradientTransformation,
    params: Any,
    grads: Any,
    mesh: Mesh,
    expected: Any = None,
    eager_update: bool = True,
) -> None:
    """Eager and jitted init and updates on the sharded ``params``: sharded state, the results
    of one device from the same initial state (``expected``: a :func:`_reference`, else
    computed), and the same types throughout. ``eager_update=False`` leaves out the eager update
    (its operations, compiled anew for every sharding, are the slow part of these tests)."""
    explicit = mesh.axis_types[0] == AxisType.Explicit
    grads = [jax.device_put(g, jax.tree.map(lambda p: p.sharding, params)) for g in grads]
    with _on(mesh):
        state = tx.init(params)
        if explicit:
            jit_state = jax.jit(tx.init)(params)
        else:  # jit cannot see Auto shardings: they are given, here those of init's state
            out_shardings = jax.tree.map(
                lambda x: x.sharding if x.ndim else NamedSharding(mesh, P()), state
            )
            jit_state = jax.jit(tx.init, out_shardings=out_shardings)(params)
        eager_grads = grads[:1] if eager_update else []
        eager = _steps(tx, state, params, eager_grads, jitted=False)
        jitted = _steps(tx, jit_state, params, grads, jitted=True)
    if expected is None:
        expected = _reference(tx, state, params, grads, eager=eager_update)
    expected_jitted, expected_eager = expected
    types = _types(state, params, explicit)
    for s in (jit_state, *eager[1], *jitted[1]):
        _assert_state_sharded_like_params(s, params)
        assert _types(s, params, explicit) == types
    for u in (*eager[0], *jitted[0]):
        for leaf, param in zip(jax.tree.leaves(u), jax.tree.leaves(params), strict=True):
            assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim)
    _assert_close(jitted, expected_jitted)
    if eager_update:
        _assert_close(eager, expected_eager)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_on_sharded_params(optimizer: str, axis_type: str) -> None:
    mesh = _mesh(axis_type)
    params, grads = _problem(SPECS["1d"])
    params = jax.device_put(params, _shardings(SPECS["1d"], mesh))
    _check(_optimizer(optimizer), params, grads, mesh, _one_device_run(optimizer, "1d"))


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_params_sharded_over_a_2d_mesh(axis_type: str) -> None:
    mesh = _mesh(axis_type, (2, 4))
    params, grads = _problem(SPECS["2d"])
    params = jax.device_put(params, _shardings(SPECS["2d"], mesh))
    _check(_optimizer("adamw_8bit"), params, grads, mesh, eager_update=False)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_flat_params_sharded(axis_type: str) -> None:
    """FlatParams buffers (one per weight-decay label) sharded over 8 devices, 8-bit AdamW."""
    mesh = _mesh(axis_type)
    tree, grads = _problem(SPECS["2d"])
    layout = flat.layout_of(tree, _matrices(tree))
    params = jax.device_put(layout.flatten(tree), NamedSharding(mesh, P("x")))
    tx = adam_jax.adamw_8bit(SCHEDULE, weight_decay=0.1, mask=flat.labels)
    quantized = [quantization.is_quantized(m) for m in tx.init(params)[0].mu.buffers]
    assert quantized == [False, True]  # the vector's buffer is too small to quantize
    _check(tx, params, [layout.flatten(g) for g in grads], mesh, eager_update=False)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_flat_wrapper_on_a_sharded_tree(axis_type: str) -> None:
    """``flat.flat`` over a tree whose leaves are sharded differently (a concatenation of them
    is a type error on Explicit meshes until they are resharded): the results of one device
    and, on Explicit meshes (where the sharding is part of the type), every update sharded like
    its gradient."""
    mesh = _mesh(axis_type)
    params, grads = _problem(SPECS["1d"])
    tx = flat.flat(adam_jax.adamw(1e-2, weight_decay=0.1, mask=flat.labels), labels=_matrices)
    (expected, _), _ = _reference(tx, tx.init(params), params, grads, eager=False)
    shardings = _shardings(SPECS["1d"], mesh)
    params = jax.device_put(params, shardings)
    grads = [jax.device_put(g, shardings) for g in grads]
    with _on(mesh):
        updates, _ = _steps(tx, tx.init(params), params, grads, jitted=True)
    _assert_close(updates, expected)
    if axis_type == "explicit":
        for u in updates:
            for leaf, param in zip(jax.tree.leaves(u), jax.tree.leaves(params), strict=True):
                assert jax.typeof(leaf).sharding.spec == jax.typeof(param).sharding.spec


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_8bit_blocks_on_a_last_axis_split_finer_than_a_block(axis_type: str) -> None:
    """Shards of 128 elements along the last axis, shorter than a default block of 256.

    Explicit axes: blocks of 128, one per shard, and the scales split like the codes. Auto
    axes: the default blocks of 256 (the layout ``jit`` sees), the codes split, the scales whole
    along the last axis (rows of 4 blocks cannot be cut in 8).
    """
    mesh = _mesh(axis_type)
    specs: Specs = {"w": ((16, 1024), P(None, "x"))}
    params, grads = _problem(specs)
    shardings = _shardings(specs, mesh)
    tx = adam_jax.adam_8bit(1e-2)
    params = jax.device_put(params, shardings)
    with _on(mesh):
        stored = tx.init(params)[0].mu["w"]
    if axis_type == "explicit":
        assert stored.absmax.shape == (16, 8)
        assert stored.absmax.sharding.spec == P(None, "x")
        _check(tx, params, grads, mesh, eager_update=False)
        return
    assert stored.absmax.shape == (16, 4)
    assert stored.absmax.sharding.is_fully_replicated
    assert {s.data.shape for s in stored.codes.addressable_shards} == {(16, 128)}
    sharding = quantization.moment_sharding(stored, shardings["w"])
    assert sharding.absmax.is_equivalent_to(stored.absmax.sharding, 2)
    grads = [jax.device_put(g, shardings) for g in grads]
    updates, states = _steps(tx, tx.init(params), params, grads, jitted=True)
    one_device = _on_one_device((params, grads))
    expected_updates, expected_states = _steps(tx, tx.init(one_device[0]), *one_device, jitted=True)
    _assert_close(updates, expected_updates)
    _assert_close(states, expected_states)
    codes = states[-1][0].nu["w"].codes
    assert {s.data.shape for s in codes.addressable_shards} == {(16, 128)}


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_init_follows_shape_dtype_structs_and_eval_shape(axis_type: str) -> None:
    """``init`` of abstract params places the state like them: a ``ShapeDtypeStruct`` with a
    sharding gives arrays with the derived shardings, and ``jax.eval_shape`` (on Explicit axes,
    where the sharding is part of the type) gives the same shapes and shardings."""
    mesh = _mesh(axis_type, (2, 4))
    params, _ = _problem(SPECS["2d"])
    shardings = _shardings(SPECS["2d"], mesh)
    abstract = jax.tree.map(
        lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, shardings
    )
    for name, tx in [("bf16", OPTIMIZERS["adam_bf16"]()), ("8bit", OPTIMIZERS["adamw_8bit"]())]:
        with _on(mesh):
            state = tx.init(abstract)
            concrete = tx.init(jax.device_put(params, shardings))
        assert jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), state) == jax.tree.map(
            lambda x: (x.shape, x.dtype, x.sharding), concrete
        ), name
        if axis_type == "explicit":
            with _on(mesh):
                shapes = jax.eval_shape(tx.init, abstract)
            for a, c in zip(jax.tree.leaves(shapes), jax.tree.leaves(state), strict=True):
                assert (a.shape, a.dtype) == (c.shape, c.dtype), name
                spec = a.sharding.spec if a.sharding is not None else P()  # None: replicated
                assert _entries(spec, a.ndim) == _entries(c.sharding.spec, c.ndim), name
