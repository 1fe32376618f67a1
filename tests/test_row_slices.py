"""``adam_jax.step_in_slices``: a large leaf stepped a slice of its rows at a time, on the device
and offloaded, with the same params and state bit for bit; which steps qualify
(``is_elementwise``, ``MomentStorage.row_slices``), the loop itself
(``in_row_slices``, private to the core), the temporaries it saves, and sharded leaves."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax
from adam_jax._src import row_slices
from adam_jax._src.elementwise import is_elementwise
from adam_jax.sharding import state_shardings
from benchmarks.sections import offload

STEPS = 3
#: Small enough that the test leaves are cut into several slices and a tail.
MOST_AT_ONCE = 1000

#: name -> (optimizer, whether its quantized leaves are stepped in slices)
SLICED = {
    # Elementwise steps with 8-bit codes.
    "adamw_8bit": (lambda: adam_jax.adamw_8bit(1e-2, weight_decay=0.1), True),
    "nadamw, 8-bit": (lambda: adam_jax.nadamw(1e-2, **adam_jax.eight_bit_moments()), True),
    "lamb, 8-bit": (lambda: adam_jax.lamb(1e-2, **adam_jax.eight_bit_moments()), True),
    "scheduled rate and decay": (
        lambda: adam_jax.adamw_8bit(
            optax.cosine_decay_schedule(1e-2, 10), weight_decay=lambda count: 0.1 / (1 + count)
        ),
        True,
    ),
    # A transcendental function in the rule (atan2): whole.
    "adam_atan2, 8-bit": (
        lambda: adam_jax.adam_atan2(1e-2, **adam_jax.eight_bit_moments()),
        False,
    ),
    # A per-tensor statistic in the rule (update clipping's RMS): whole.
    "stable_adamw, 8-bit": (
        lambda: adam_jax.stable_adamw(1e-2, **adam_jax.eight_bit_moments()),
        False,
    ),
    # A storage with column statistics (4-bit rank-1 nu): whole.
    "4-bit moments": (lambda: adam_jax.adamw(1e-2, **adam_jax.four_bit_moments()), False),
    # Nothing decoded: whole (nothing to save).
    "float32 AdamW": (lambda: adam_jax.adamw(1e-2), False),
}


def _params() -> dict[str, jax.Array]:
    """A 64 x 64 kernel (8-bit blocks of four rows), 301 rows of 40 (a tail slice), 28 rows of
    64 (seven blocks), and a bias (not quantized)."""
    return {
        "kernel": jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64),
        "wide": jnp.linspace(-2.0, 2.0, 301 * 40).reshape(301, 40),
        "short_rows": jnp.cos(jnp.arange(28 * 64.0)).reshape(28, 64),
        "bias": jnp.linspace(0.5, -0.5, 64),
    }


def _grads(params: Any, step: int) -> Any:
    return jax.tree.map(lambda p: jnp.sin((step + 1.0) * p) + 0.1 * p - 0.05, params)


def _run(tx: optax.GradientTransformation, params: Any) -> tuple[Any, Any]:
    update = jax.jit(tx.update)
    state = tx.init(params)
    for step in range(STEPS):
        updates, state = update(_grads(params, step), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_same(ours: Any, theirs: Any) -> None:
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _loops(tx: optax.GradientTransformation) -> bool:
    params = _params()
    jaxpr = str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))
    return "while[" in jaxpr or "scan[" in jaxpr


@pytest.mark.parametrize("offloaded", [False, True], ids=["on the device", "offloaded"])
@pytest.mark.parametrize("name", SLICED)
def test_a_leaf_stepped_in_slices_is_bit_for_bit(name: str, offloaded: bool) -> None:
    """An elementwise step of a leaf whose storages keep rows apart runs in a loop over slices
    of its rows (other leaves and steps whole), with the same params and state bit for bit."""
    factory, sliced = SLICED[name]
    tx = adam_jax.step_in_slices(factory(), MOST_AT_ONCE)
    if offloaded:
        tx = adam_jax.offload_state(tx)
    _assert_same(_run(tx, _params()), _run(factory(), _params()))
    assert _loops(tx) == sliced


def test_max_elements_is_checked_at_construction() -> None:
    for bad in (0, -3, 2.5, True, "1024"):
        with pytest.raises(ValueError, match="max_elements must be an integer >= 1"):
            adam_jax.step_in_slices(adam_jax.adamw_8bit(1e-2), bad)


def test_a_leaf_of_one_slice_or_less_is_stepped_whole() -> None:
    assert not _loops(adam_jax.step_in_slices(adam_jax.adamw_8bit(1e-2), 301 * 40))
    assert _loops(adam_jax.step_in_slices(adam_jax.adamw_8bit(1e-2), 301 * 40 - 1))


def test_a_leaf_in_slices_holds_one_slice_of_float32_temporaries() -> None:
    """The 8-bit step of one 4M-entry leaf, compiled from abstract shapes, on the device and
    offloaded. Whole, it holds at least two float32 arrays of the leaf's size besides its
    arguments (new moments, update); in slices of 64K entries, the update and less than a
    quarter of a leaf more. In a train step, whose gradient dies at the update, the update takes
    the gradient's buffer: the gradient and a quarter of a leaf, where whole holds three
    leaves more."""
    params = {"w": jax.ShapeDtypeStruct((4096, 1024), jnp.float32)}
    leaf = 4 * 4096 * 1024

    def whole() -> optax.GradientTransformation:
        return adam_jax.adamw_8bit(1e-2)

    def sliced() -> optax.GradientTransformation:
        return adam_jax.step_in_slices(adam_jax.adamw_8bit(1e-2), 1 << 16)

    for compiled in offload.compiled_steps(whole, params)[:2]:
        assert offload.device_bytes(compiled)["temporaries"] >= 2 * leaf
    for compiled in offload.compiled_steps(sliced, params)[:2]:
        assert offload.device_bytes(compiled)["temporaries"] <= 1.25 * leaf

    def train_temporaries(tx: optax.GradientTransformation) -> int:
        state = offload.in_host_memory(tx, params)

        def step(params: Any, x: jax.Array, state: Any) -> tuple[Any, Any]:
            grads = jax.grad(lambda p: jnp.sum(jnp.sin(p["w"]) * x))(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        compiled = jax.jit(step, donate_argnums=(0, 2)).lower(params, params["w"], state).compile()
        return offload.device_bytes(compiled)["temporaries"]

    assert train_temporaries(adam_jax.offload_state(whole())) >= 3 * leaf
    assert train_temporaries(adam_jax.offload_state(sliced())) <= 1.25 * leaf


@pytest.mark.parametrize("spec", [P("data"), P(None, "data")])
def test_slices_of_a_leaf_sharded_on_an_auto_mesh_are_bit_for_bit(spec: P) -> None:
    """Under automatic sharding the core cannot see a leaf's shards: its slices are cut anyway,
    and the partitioner moves what they need (along a sharded first axis, collectives in each
    pass: the docstring's caveat); the params and state stay the whole step's, and with the
    state's shardings given, so do its shards."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    params = jax.device_put(
        {"kernel": _params()["kernel"], "wide": jnp.linspace(-2.0, 2.0, 304 * 40).reshape(304, 40)},
        NamedSharding(mesh, spec),
    )

    def run(tx: optax.GradientTransformation) -> tuple[Any, Any]:
        # The state's shardings given: the partitioner cannot carry them through the slices.
        shardings = state_shardings(tx, params, mesh)
        p, state = params, jax.jit(tx.init, out_shardings=shardings)(params)
        update = jax.jit(tx.update, out_shardings=(None, shardings))
        for step in range(STEPS):
            updates, state = update(_grads(p, step), state, p)
            p = optax.apply_updates(p, updates)
        return p, state

    with jax.set_mesh(mesh):
        got = run(adam_jax.step_in_slices(adam_jax.adamw_8bit(1e-2), MOST_AT_ONCE))
        whole = run(adam_jax.adamw_8bit(1e-2))
    _assert_same(got, whole)
    assert [x.sharding for x in jax.tree.leaves(got)] == [
        x.sharding for x in jax.tree.leaves(whole)
    ]


SHAPE = (6, 5)


@pytest.mark.parametrize(
    ("fn", "elementwise"),
    [
        (lambda g, m: (m + 0.1 * (g - m), g / (jnp.sqrt(jnp.square(m)) + 1e-8)), True),
        (lambda g, m: (jnp.where(g > 0, g, m * 2.0), jnp.clip(m, -1.0, 1.0)), True),
        (lambda g, m: g / jnp.sum(m), False),  # a per-tensor reduction
        (lambda g, m: jnp.exp(g) + m, False),  # a transcendental: rounds per vector lane
        (lambda g, m: g[::-1] + m, False),  # another element's value
        (lambda g, m: g + jnp.mean(m, axis=0, keepdims=True), False),  # a broadcast row
        (lambda g, m: g + jax.random.normal(jax.random.key(0), g.shape), False),
    ],
)
def test_is_elementwise_accepts_only_steps_of_each_element_alone(fn, elementwise: bool) -> None:
    g = jax.ShapeDtypeStruct(SHAPE, jnp.float32)
    assert is_elementwise(fn, SHAPE, g, g) == elementwise


def test_in_row_slices_gives_the_whole_leafs_results() -> None:
    """A step with one stored value per two rows (as an 8-bit scale spanning rows), in slices
    of at most 20 elements of 5 per row: four rows a slice, then a tail of one pair; each slice
    sees its own rows of the gradient, param and stored arrays."""
    grad = jnp.arange(50.0).reshape(10, 5)
    param = -grad
    stored = {"codes": jnp.arange(50).reshape(10, 5), "scale": jnp.arange(5.0)[:, None]}

    def step(g, p, s):
        scale = jnp.repeat(s["scale"], 2, axis=0)
        new = {"codes": s["codes"] + 1, "scale": s["scale"] + jnp.max(g[::2], axis=1)[:, None]}
        return g * scale + p, new

    update, new = row_slices.in_row_slices(step, grad, param, stored, max_elements=20)
    want_update, want_new = step(grad, param, stored)
    np.testing.assert_array_equal(update, want_update)
    jax.tree.map(np.testing.assert_array_equal, new, want_new)
    # Rows the stored arrays do not cut evenly, or a leaf of one slice: not sliced.
    odd = {"scale": jnp.zeros((3, 1))}
    assert row_slices.in_row_slices(step, grad, param, odd, max_elements=12) is None
    assert row_slices.in_row_slices(step, grad, param, stored, max_elements=50) is None
