"""``adam_jax.relayout_soap_state``: SOAP's factors and bases, spread over N devices
(``block_axis``), re-laid for M, on meshes of 8, 4, 3 and 1 host CPU devices (conftest's
XLA_FLAGS).

* Every block's matrices are the same after the re-lay (read by ``SoapLayout.unpack_blocks`` for
  each count), bit for bit; the vector has the layout's size for M, its empty slots zero, its
  dtype kept (float32, bfloat16); N -> M -> N gives the vector back.
* SOAP stepped on M devices from the re-laid state (through a refresh of the bases) gives the
  updates it gives on N from the original.
* Wrong options (a vector of another length), counts below 1, 8-bit or 4-bit codes and a state
  without SOAP are refused, the message naming the problem.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax
from adam_jax._src.variants.soap import SoapLayout

if jax.device_count() < 8:
    pytest.skip("needs 8 host devices (XLA_FLAGS in conftest)", allow_module_level=True)

BLOCK = 8
# w1: 5 x 2 blocks of 8 x 8 and 5 of 8 x 4 (the columns' remainder); w2: 3 x 2 of 8 x 8; the
# bias none (no factor). No group's count divides 3, 4 or 8 but w2's 6 by 3.
SHAPES = {"w1": (40, 20), "w2": (24, 16), "b": (24,)}
OPTIONS = {"block_size": BLOCK, "precondition_frequency": 2, "weight_decay": 0.0}
PAIRS = [(8, 4), (8, 1), (1, 8), (8, 3), (3, 8), (4, 8)]
_BLOCKS = {"block_size": BLOCK}


def _tree(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _mesh(devices: int) -> Any:
    return jax.make_mesh(
        (devices,),
        ("data",),
        axis_types=(jax.sharding.AxisType.Explicit,),
        devices=jax.devices()[:devices],
    )


def _layout(devices: int) -> SoapLayout:
    return SoapLayout(10000, merge_dims=False, precondition_1d=False, block_size=BLOCK).on_devices(
        devices
    )


def _filled(devices: int, **options: Any) -> tuple[Any, Any]:
    """SOAP's state initialized on a mesh of ``devices`` (the blocks spread over it), its
    vectors filled with distinct values where a block sits and zeros in the empty slots (laid
    out as the docs say, independently of the layout's code); and the mesh."""
    mesh = _mesh(devices)
    with jax.set_mesh(mesh):
        tx = adam_jax.soap(1e-2, block_axis="data", **(OPTIONS | options))
        params = jax.device_put(_tree(0), NamedSharding(mesh, P()))
        state = jax.jit(tx.init)(params)
    layout = _layout(devices)
    soap_state = state[0]
    fields = {}
    for offset, field in enumerate(("gg", "q")):
        vectors = {}
        for k, shape in SHAPES.items():
            stored = getattr(soap_state, field)[k]
            assert stored.shape == (layout.size(shape),)
            vectors[k] = (_occupied(layout, shape) * (np.arange(stored.size) + 1 + offset)).astype(
                stored.dtype
            )
        fields[field] = vectors
    return (soap_state._replace(**fields), *state[1:]), mesh


def _occupied(layout: SoapLayout, shape: tuple[int, ...]) -> np.ndarray:
    """1 where a block's values sit in the leaf's vector, 0 in the empty slots: device after
    device, per group its slots, the last ``slots * devices - n`` slots of a group empty."""
    devices, slots = layout.placement(shape)
    mask = []
    for device in range(devices):
        for g, s in zip(layout.groups(shape), slots, strict=True):
            owned = min(s, max(g.n - device * s, 0))
            mask += [1] * (owned * g.stride) + [0] * ((s - owned) * g.stride)
    return np.array(mask, dtype=np.float32)


def _assert_same_blocks(a: np.ndarray, n: int, b: np.ndarray, m: int, shape: tuple) -> None:
    blocks_a = _layout(n).unpack_blocks(np.asarray(a), shape)
    blocks_b = _layout(m).unpack_blocks(np.asarray(b), shape)
    assert len(blocks_a) == len(blocks_b) == _layout(1).num_blocks(shape)
    for x, y in zip(blocks_a, blocks_b, strict=True):
        for u, v in zip(x, y, strict=True):
            assert (u is None) == (v is None)
            if u is not None:
                np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize(("n", "m"), PAIRS, ids=[f"{n}to{m}" for n, m in PAIRS])
def test_blocks_are_moved_unchanged(n: int, m: int) -> None:
    state, _ = _filled(n)
    params = _tree(0)
    relaid = adam_jax.relayout_soap_state(state, params, devices_from=n, devices_to=m, **_BLOCKS)
    back = adam_jax.relayout_soap_state(relaid, params, devices_from=m, devices_to=n, **_BLOCKS)
    for field in ("gg", "q"):
        for k, shape in SHAPES.items():
            before = np.asarray(getattr(state[0], field)[k])
            after = getattr(relaid[0], field)[k]
            assert isinstance(after, np.ndarray) and after.dtype == before.dtype
            assert after.shape == (_layout(m).size(shape),)
            _assert_same_blocks(before, n, after, m, shape)
            # The empty slots are zeros, and every value of a block is somewhere.
            occupied = _occupied(_layout(m), shape)
            assert not after[occupied == 0].any()
            np.testing.assert_array_equal(
                np.sort(after[occupied == 1]), np.sort(before[before != 0])
            )
            np.testing.assert_array_equal(getattr(back[0], field)[k], before)
    # The other fields as they were.
    assert relaid[0].count is state[0].count
    assert relaid[0].mu is state[0].mu and relaid[0].nu is state[0].nu


def _steps(state: Any, tx: Any, params: Any, grads: list, mesh: Any) -> tuple[list, Any]:
    with jax.set_mesh(mesh):
        step = jax.jit(tx.update)
        updates = []
        for g in grads:
            g = jax.device_put(g, NamedSharding(mesh, P()))
            u, state = step(g, state, params)
            updates.append({k: np.asarray(v) for k, v in u.items()})
    return updates, state


def _placed(state: Any, like: Any) -> Any:
    """``state``'s arrays (host or on another mesh) with ``like``'s shardings."""
    return jax.tree.map(lambda x, t: jax.device_put(np.asarray(x), t.sharding), state, like)


@pytest.mark.parametrize(
    ("n", "m", "stacked"),
    [(8, 3, False), (1, 8, False), (8, 3, True)],
    ids=["8to3", "1to8", "8to3, stacked"],
)
def test_soap_steps_on_the_new_count_as_on_the_old(n: int, m: int, stacked: bool) -> None:
    """Three steps on N (a refresh after the second), the state re-laid for M, then two more
    steps (a refresh after the fourth) on each: the same updates. With ``stack_blocks`` the
    stacks (w1's and w2's 8 x 8 blocks in one, w1's 8 x 4 in another) are re-laid."""
    grads = [_tree(1 + i) for i in range(5)]
    meshes, txs, params = {}, {}, {}
    states = {}
    for count in (n, m):
        meshes[count] = mesh = _mesh(count)
        with jax.set_mesh(mesh):
            txs[count] = adam_jax.soap(1e-2, block_axis="data", stack_blocks=stacked, **OPTIONS)
            params[count] = jax.device_put(_tree(0), NamedSharding(mesh, P()))
            states[count] = jax.jit(txs[count].init)(params[count])
    _, state = _steps(states[n], txs[n], params[n], grads[:3], meshes[n])
    want, _ = _steps(state, txs[n], params[n], grads[3:], meshes[n])
    relaid = adam_jax.relayout_soap_state(state, params[n], devices_from=n, devices_to=m, **_BLOCKS)
    ours, after = _steps(_placed(relaid, states[m]), txs[m], params[m], grads[3:], meshes[m])
    assert any(np.abs(u["w1"]).max() > 0 for u in want)
    for step, (u, w) in enumerate(zip(ours, want, strict=True)):
        for k in w:
            np.testing.assert_array_equal(u[k], w[k], err_msg=f"{k}@{step}")
    bases = after[0].stacks.q["8x8"]["dim0"] if stacked else after[0].q["w1"]
    assert bases.sharding.spec[0] == "data" and not any(bases.sharding.spec[1:])


def test_bfloat16_factors_and_bases_are_relaid_exactly() -> None:
    state, _ = _filled(8, factor_dtype=jnp.bfloat16, basis_dtype=jnp.bfloat16)
    assert state[0].gg["w1"].dtype == jnp.bfloat16
    params = _tree(0)
    relaid = adam_jax.relayout_soap_state(state, params, devices_from=8, devices_to=3, **_BLOCKS)
    back = adam_jax.relayout_soap_state(relaid, params, devices_from=3, devices_to=8, **_BLOCKS)
    for field in ("gg", "q"):
        for k, shape in SHAPES.items():
            after = getattr(relaid[0], field)[k]
            # The bias has no factor: its empty vector stays float32.
            assert after.dtype == (jnp.float32 if k == "b" else jnp.bfloat16)
            _assert_same_blocks(getattr(state[0], field)[k], 8, after, 3, shape)
            np.testing.assert_array_equal(
                getattr(back[0], field)[k], np.asarray(getattr(state[0], field)[k])
            )


def test_a_vector_of_other_options_is_refused_naming_the_leaf() -> None:
    state, _ = _filled(8)
    params = _tree(0)
    with pytest.raises(
        ValueError,
        match=r"factors \(gg\) of leaf \['w1'\].*vector of 2688 values.*devices_from=4 "
        r"devices they are 2176 values",
    ):
        adam_jax.relayout_soap_state(state, params, devices_from=4, devices_to=8, **_BLOCKS)
    with pytest.raises(ValueError, match=r"leaf \['w1'\].*block_size=16"):
        adam_jax.relayout_soap_state(state, params, devices_from=8, devices_to=4, block_size=16)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"devices_from": 0, "devices_to": 4}, "devices_from must be an integer >= 1, got 0"),
        ({"devices_from": 8, "devices_to": -1}, "devices_to must be an integer >= 1, got -1"),
        ({"devices_from": 8, "devices_to": 2.0}, "devices_to must be an integer >= 1, got 2.0"),
        (
            {"devices_from": 8, "devices_to": 4, "block_size": 0},
            "block_size must be an integer >= 1, got 0",
        ),
        (
            {"devices_from": 8, "devices_to": 4, "max_precond_dim": 0},
            "max_precond_dim must be an integer >= 1, got 0",
        ),
    ],
)
def test_counts_out_of_range_are_refused(options: dict, message: str) -> None:
    state = adam_jax.soap(1e-2, block_size=BLOCK).init(_tree(0))
    with pytest.raises(ValueError, match=message):
        adam_jax.relayout_soap_state(state, _tree(0), **(_BLOCKS | options))


# min_size 0: the storages keep a vector of fewer values (4096 by default) unquantized.
@pytest.mark.parametrize(
    "storage",
    [adam_jax.BlockwiseQuantized(min_size=0), adam_jax.FourBitBlockwise(min_size=0)],
    ids=["8bit", "4bit"],
)
def test_quantized_bases_are_refused(storage: Any) -> None:
    params = _tree(0)
    state = adam_jax.soap(1e-2, block_size=BLOCK, basis_dtype=storage).init(params)
    with pytest.raises(
        ValueError, match=r"bases \(q\) of leaf \['w1'\].*cannot be re-laid exactly.*same number"
    ):
        adam_jax.relayout_soap_state(state, params, devices_from=1, devices_to=2, **_BLOCKS)


def test_a_state_without_soap_is_refused() -> None:
    params = _tree(0)
    state = adam_jax.adamw(1e-2).init(params)
    with pytest.raises(ValueError, match="holds no ScaleBySoapState"):
        adam_jax.relayout_soap_state(state, params, devices_from=8, devices_to=4, **_BLOCKS)
