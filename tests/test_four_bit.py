"""Tests of the 4-bit moment storage (Li, Chen and Zhu, NeurIPS 2023): adam_jax.quantization's
four_bit_moments, FourBitBlockwise (B128/DE first moment) and FourBitRank1 (rank-1
normalization, linear map without zero, second moment).

* The maps are the paper's: the signed dynamic-exponent map rebuilt here from the authors'
  construction (``lpmm.functional.create_dynamic_map(True, 3, 4)``), and ``(k + 1) / 16``.
* The codes equal a float64 NumPy reference of the whole codec (scales, normalization,
  nearest entry with ties to the lower) exactly, for adversarial inputs at every midpoint.
* The round trip keeps the paper's error bounds: ``0.1125`` of the block's absmax for the first
  moment, ``1/16`` of ``min(row max, column max)`` for the second (``1/32`` above the first
  entry), and no second moment decodes to zero while its row and column have a non-zero value.
* Two codes per byte; bytes per parameter of 4-bit Adam under 5.1 with float32 params.
* Every optimizer of the family takes the storages; nnx.Optimizer, checkpoints and ZeRO-1 are
  tested with the other reduced storages in test_reduced_moments.py.
"""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adam_jax
from adam_jax import quantization as qz
from adam_jax._src.quantization import blocks, four_bit

SIGNED_ERROR, LINEAR_ERROR = 0.1125, 1 / 16


def _authors_dynamic_map() -> np.ndarray:
    """The authors' create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4): for
    decade i = 0, 1, 2, the 2**i midpoints of linspace(0.1, 1, 2**i + 1) times 10**(i - 2),
    both signs, then 0 and 1."""
    data = [0.0, 1.0]
    for i in range(3):
        boundaries = np.linspace(0.1, 1.0, 2**i + 1, dtype=np.float32)
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2)
        data += [s * 10.0 ** (i - 2) * float(m) for m in means for s in (1.0, -1.0)]
    return np.sort(np.asarray(data, np.float64))


def _nearest(normalized: np.ndarray, entries: np.ndarray) -> np.ndarray:
    """Float64 nearest-entry search, ties to the lower entry."""
    distance = np.abs(normalized[..., None].astype(np.float64) - entries.astype(np.float64))
    return np.argmin(distance, axis=-1)  # argmin takes the first (lower) of equal distances


def _adversarial(signed: bool) -> np.ndarray:
    """Every midpoint of the map and its three float32 neighbours on each side, the ends, zero
    and uniform values of the range."""
    entries = qz.create_four_bit_map(signed).astype(np.float64)
    points = [((a + b) / 2) for a, b in zip(entries[:-1], entries[1:], strict=True)]
    values = []
    for p in np.asarray(points, np.float32):
        v = p
        for _ in range(3):
            v = np.nextafter(v, np.float32(-2))
        for _ in range(7):
            values.append(v)
            v = np.nextafter(v, np.float32(2))
    lo = -1.0 if signed else 0.0
    values += [lo, 0.0, 1.0, *np.linspace(lo, 1.0, 1001)]
    return np.asarray(values, np.float32)


def test_maps_are_the_papers() -> None:
    signed = qz.create_four_bit_map(signed=True)
    assert signed.dtype == np.float32 and signed.shape == (16,)
    np.testing.assert_array_equal(signed, _authors_dynamic_map().astype(np.float32))
    linear = qz.create_four_bit_map(signed=False)
    np.testing.assert_array_equal(linear, np.arange(1, 17) / 16)  # no zero: the zero point
    assert qz.max_four_bit_error(True) == pytest.approx(SIGNED_ERROR, rel=1e-6)
    assert qz.max_four_bit_error(False) == LINEAR_ERROR


@pytest.mark.parametrize("signed", [True, False])
def test_codes_are_the_nearest_entries(signed: bool) -> None:
    from adam_jax._src.quantization.four_bit import decode_four_bit, encode_four_bit

    x = _adversarial(signed)
    codes = np.asarray(jax.jit(lambda v: encode_four_bit(v, signed))(x))
    np.testing.assert_array_equal(codes, _nearest(x, qz.create_four_bit_map(signed)))
    decoded = np.asarray(jax.jit(lambda c: decode_four_bit(c, signed))(jnp.arange(16)))
    np.testing.assert_array_equal(decoded, qz.create_four_bit_map(signed))
    jaxpr = str(jax.make_jaxpr(lambda v: decode_four_bit(encode_four_bit(v, signed), signed))(x))
    assert "gather" not in jaxpr  # elementwise selects, no table lookup


def _blocks_reference(x: np.ndarray, tile: tuple[int, int], signed: bool) -> tuple:
    """Float64 reference of the first moment's codec on a matrix cut in ``tile`` blocks (the
    last block of a row shorter where the tile overruns it): absmax per block, the float32
    quotient, the nearest entry; codes and the decoded values."""
    rows, cols = x.shape
    entries = qz.create_four_bit_map(signed)
    padded = np.pad(x, [(0, 0), (0, -cols % tile[1])])
    blocks = padded.reshape(rows // tile[0], tile[0], -1, tile[1])
    absmax = np.abs(blocks).max(axis=(1, 3), keepdims=True).astype(np.float32)
    normalized = (blocks / np.where(absmax > 0, absmax, np.float32(1))).astype(np.float32)
    codes = _nearest(normalized, entries)
    decoded = (entries[codes] * absmax).astype(np.float32)
    return tuple(a.reshape(padded.shape)[:, :cols] for a in (codes, decoded)) + (absmax,)


def _unpacked(stored: qz.PackedQuantizedArray | qz.Rank1QuantizedArray, n: int) -> np.ndarray:
    packed = np.asarray(stored.codes).astype(np.int64)
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)[..., :n]


@pytest.mark.parametrize(
    ("shape", "tile"),
    [((8, 512), (1, 128)), ((64, 32), (4, 32)), ((8, 301), (1, 101))],  # the last: ragged, odd
)
def test_first_moment_codec_matches_the_float64_reference(shape, tile) -> None:
    x = np.asarray(jax.random.normal(jax.random.key(0), shape)) * np.logspace(-6, 0, shape[1])
    x[0, :5] = 0.0
    storage = qz.FourBitBlockwise(min_size=0)
    stored = jax.jit(storage.store)(jnp.asarray(x), storage.init(jnp.asarray(x)))
    codes, decoded, absmax = _blocks_reference(x.astype(np.float32), tile, signed=True)
    np.testing.assert_array_equal(_unpacked(stored, shape[1]), codes)
    np.testing.assert_array_equal(np.asarray(stored.absmax).ravel(), absmax.ravel())
    np.testing.assert_array_equal(np.asarray(storage.load(stored)), decoded)


def _rank1_reference(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 reference of the second moment's codec: the scale min(row max, column max), the
    float32 quotient, the nearest entry of the linear map; codes and decoded values."""
    entries = qz.create_four_bit_map(signed=False)
    scale = np.minimum(v.max(axis=-1, keepdims=True), v.max(axis=0, keepdims=True))
    normalized = (v / np.where(scale > 0, scale, np.float32(1))).astype(np.float32)
    codes = _nearest(normalized, entries)
    return codes, (entries[codes] * scale).astype(np.float32)


def test_second_moment_codec_matches_the_float64_reference() -> None:
    g = np.asarray(jax.random.normal(jax.random.key(1), (48, 33)), np.float32)
    v = (g**2 * np.logspace(-8, 0, 33, dtype=np.float32)).astype(np.float32)
    v[3] = 0.0  # a row of zeros decodes to zeros
    storage = qz.FourBitRank1(min_size=0)
    stored = jax.jit(storage.store)(jnp.asarray(v), storage.init(jnp.asarray(v)))
    codes, decoded = _rank1_reference(v)
    np.testing.assert_array_equal(_unpacked(stored, 33), codes)
    assert stored.codes.shape == (48, 17)  # an odd row ends in a padding nibble
    got = np.asarray(storage.load(stored))
    np.testing.assert_array_equal(got, decoded)
    assert np.all(got[3] == 0) and np.all(got[np.arange(48) != 3] > 0)


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    log_scale=st.floats(-30, 10),
    seed=st.integers(0, 2**16),
)
def test_round_trip_keeps_the_error_bounds(rows: int, cols: int, log_scale: float, seed: int):
    x = np.asarray(jax.random.normal(jax.random.key(seed), (rows, cols))) * np.exp(log_scale)
    x = x.astype(np.float32)
    mu, nu = qz.FourBitBlockwise(min_size=0), qz.FourBitRank1(min_size=0)
    stored_mu = mu.store(jnp.asarray(x), mu.init(jnp.asarray(x)))
    back = np.asarray(mu.load(stored_mu), np.float64)
    # Each element within SIGNED_ERROR of its block's absmax (+ float32 rounding).
    absmax = np.asarray(stored_mu.absmax, np.float64)
    per_element = np.broadcast_to(np.max(np.abs(x)) if absmax.size == 1 else absmax.max(), x.shape)
    assert np.all(np.abs(back - x) <= per_element * (SIGNED_ERROR + 1e-6))
    v = (x.astype(np.float64) ** 2).astype(np.float32)
    stored_nu = nu.store(jnp.asarray(v), nu.init(jnp.asarray(v)))
    back_v = np.asarray(nu.load(stored_nu), np.float64)
    scale = np.minimum(v.max(axis=1, keepdims=True), v.max(axis=0, keepdims=True))
    error = np.abs(back_v - v)
    assert np.all(error <= scale * (LINEAR_ERROR + 1e-6))
    above = v >= scale / 16
    assert np.all(error[above] <= (scale * np.ones_like(v))[above] * (1 / 32 + 1e-6))
    assert np.all(back_v[scale[:, :] * np.ones_like(v) > 0] > 0)  # zero-free


def test_block_scales_bound_each_block() -> None:
    x = np.zeros((4, 256), np.float32)
    x[:, :128] = np.linspace(-1, 1, 128)
    x[:, 128:] = np.linspace(-1e-4, 1e-4, 128)  # a block of small values keeps its precision
    storage = qz.FourBitBlockwise(min_size=0)
    back = np.asarray(storage.load(storage.store(jnp.asarray(x), storage.init(jnp.asarray(x)))))
    assert np.max(np.abs(back[:, 128:] - x[:, 128:])) <= 1e-4 * SIGNED_ERROR * (1 + 1e-6)
    np.testing.assert_array_equal(np.sign(back[np.abs(x) > 0.01]), np.sign(x[np.abs(x) > 0.01]))


@pytest.mark.parametrize("shape", [(4097,), (300, 257), (3, 5, 7, 41), (4, 4096)])
def test_odd_and_even_last_axes_round_trip(shape: tuple[int, ...]) -> None:
    x = jax.random.normal(jax.random.key(2), shape)
    pairs = ((qz.FourBitBlockwise(min_size=0), x), (qz.FourBitRank1(min_size=0), x**2))
    for storage, value in pairs:
        stored = jax.jit(storage.store)(value, storage.init(value))
        assert stored.codes.shape == shape[:-1] + ((shape[-1] + 1) // 2,)
        assert stored.codes.dtype == jnp.uint8
        back = storage.load(stored)
        assert back.shape == shape and back.dtype == jnp.float32
        bound = SIGNED_ERROR if isinstance(storage, qz.FourBitBlockwise) else LINEAR_ERROR
        largest = float(jnp.max(jnp.abs(value)))
        assert float(jnp.max(jnp.abs(back - value))) <= largest * bound * 1.001


def test_four_bit_adam_is_under_5_1_bytes_per_parameter() -> None:
    params = {
        "embed": jax.ShapeDtypeStruct((1024, 256), jnp.float32),
        "mlp": jax.ShapeDtypeStruct((256, 1024), jnp.float32),
        "bias": jax.ShapeDtypeStruct((1024,), jnp.float32),
    }
    n = sum(int(np.prod(p.shape)) for p in params.values())
    tx = adam_jax.adamw(1e-3, **qz.four_bit_moments())
    state = jax.eval_shape(tx.init, params)
    total = adam_jax.state_bytes(params) + adam_jax.state_bytes(state)
    assert total / n <= 5.1
    mu, nu = state[0].mu, state[0].nu
    assert isinstance(mu["mlp"], qz.PackedQuantizedArray)
    assert isinstance(nu["mlp"], qz.Rank1QuantizedArray)
    assert mu["bias"].dtype == jnp.float32  # under min_size: float32, as the paper


def test_small_complex_and_integer_leaves() -> None:
    storages = qz.four_bit_moments(min_size=8)
    tx = adam_jax.adam(1e-2, **storages)
    state = tx.init({"c": jnp.ones((4, 4), jnp.complex64), "s": jnp.ones(3), "x": jnp.ones(())})
    mu, nu = state[0].mu, state[0].nu
    # A complex param's first moment stays complex64; its second moment is real: 4 bits.
    assert mu["c"].dtype == jnp.complex64 and isinstance(nu["c"], qz.Rank1QuantizedArray)
    assert mu["s"].dtype == jnp.float32 and mu["x"].shape == ()
    updates, _ = tx.update({"c": jnp.full((4, 4), 1 + 1j), "s": jnp.ones(3), "x": 1.0}, state)
    assert updates["c"].dtype == jnp.complex64
    message = r"moment 'mu' of leaf \['step'\]: FourBitBlockwise .* int32"
    with pytest.raises(ValueError, match=message):
        tx.init({"w": jnp.ones((64, 64)), "step": jnp.zeros((64, 64), jnp.int32)})
    for bad in ({"block_size": 0}, {"min_size": -1}, {"block_size": 2.5}):
        with pytest.raises(ValueError, match="must be an integer"):
            qz.four_bit_moments(**bad)


def test_moment_sharding_of_four_bit_forms() -> None:
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    mu, nu = qz.FourBitBlockwise(min_size=0), qz.FourBitRank1(min_size=0)
    odd = mu.init(np.zeros((64, 257), np.float32))
    placed = qz.moment_sharding(odd, sharding)
    assert isinstance(placed, qz.PackedQuantizedArray)
    assert len(placed.absmax.spec) == 3 and placed.codes.spec[0] == "x"
    placed = qz.moment_sharding(nu.init(np.zeros((64, 32), np.float32)), sharding)
    assert isinstance(placed, qz.Rank1QuantizedArray)
    assert placed.row_max.spec[0] == "x" and placed.col_max.spec[0] is None  # 1 row: whole


def test_four_bit_adam_trains_close_to_float32() -> None:
    params = {"w": jnp.linspace(-2.0, 2.0, 64 * 128).reshape(64, 128), "b": jnp.ones(10)}
    target = jnp.sin(jnp.arange(64 * 128).reshape(64, 128) * 0.01)

    def run(tx: optax.GradientTransformation) -> dict:
        p, state = params, tx.init(params)

        @jax.jit
        def step(p, state):
            g = jax.grad(lambda q: jnp.sum((q["w"] - target) ** 2) + jnp.sum(q["b"] ** 2))(p)
            u, state = tx.update(g, state, p)
            return optax.apply_updates(p, u), state

        for _ in range(100):
            p, state = step(p, state)
        return p

    p32 = run(adam_jax.adam(0.05))
    storages = qz.four_bit_moments()
    p4 = run(adam_jax.adam(0.05, **storages))
    start = float(jnp.mean((params["w"] - target) ** 2))
    assert float(jnp.mean((p4["w"] - target) ** 2)) < 0.01 * start
    np.testing.assert_array_equal(np.asarray(p4["b"]), np.asarray(p32["b"]))  # float32 leaf
    # The second moment alone costs nothing here; the first moment's 16 levels, rounded to
    # nearest at every step as in the paper, slow the last digits of this noiseless descent.
    p4_nu = run(adam_jax.adam(0.05, nu_dtype=storages["nu_dtype"]))
    np.testing.assert_allclose(np.asarray(p4_nu["w"]), np.asarray(p32["w"]), atol=0.05)


@pytest.mark.parametrize(
    "shape", [(1024, 521), (1 << 19,), (2048, 256), (4, 256, 512), (1 << 14, 32)]
)
def test_two_passes_encode_what_one_pass_does(shape) -> None:
    """Off the CPU a large 4-bit leaf is stepped in two passes: the new moments' block, row and
    column maxima first (the columns' from a computation of their own), then the moments again,
    encoded and packed by a kernel of their own (a half of each byte at a time where the last
    axis is even). Run here (an odd last axis, a vector's blocks, a 3-D leaf, rows shorter than
    a block), its scales are one pass's to XLA's contraction of the moving average (an ulp),
    its codes within one step, and its update one pass's to float32 rounding."""
    from tests.test_quantization import _stepped_off_cpu

    assert np.prod(shape) >= blocks.TWO_PASSES_MIN_SIZE
    tx = adam_jax.adamw(1e-2, b1=0.8, **adam_jax.four_bit_moments())
    params = {"w": jax.random.normal(jax.random.key(0), shape)}
    grads = [{"w": 10.0 ** (i - 2) * jax.random.normal(jax.random.key(i), shape)} for i in (1, 2)]
    state = tx.init(params)
    state = jax.jit(tx.update)(grads[0], state, params)[1]  # moments of every size

    one_update, one_state = jax.jit(tx.update)(grads[1], state, params)
    method = "store_halves" if shape[-1] % 2 == 0 else "store_scaled"
    spies = [
        mock.patch.object(kind, method, autospec=True, side_effect=getattr(kind, method))
        for kind in (qz.FourBitBlockwise, qz.FourBitRank1)
    ]
    with spies[0] as blockwise, spies[1] as rank1:
        two_update, two_state = _stepped_off_cpu(tx, grads[1], state, params)
    assert blockwise.call_count == rank1.call_count == 1  # in two passes
    for name in ("mu", "nu"):
        one, two = getattr(one_state[0], name)["w"], getattr(two_state[0], name)["w"]
        scales = [field for field in one._fields if field != "codes"]
        for field in scales:
            np.testing.assert_allclose(getattr(two, field), getattr(one, field), rtol=3e-7, atol=0)
        steps = np.abs(_unpacked(two, shape[-1]).astype(np.int32) - _unpacked(one, shape[-1]))
        assert steps.max() <= 1, name
        assert (steps > 0).mean() < 1e-3, name
    np.testing.assert_allclose(two_update["w"], one_update["w"], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(
    ("shape", "mu_only"),
    [((2048, 256), False), ((1 << 19,), False), ((4, 256, 512), False), ((1 << 14, 32), True)],
)
def test_codes_packed_a_half_at_a_time_are_the_whole_moments(shape, mu_only) -> None:
    """The kernel that packs a large 4-bit leaf's new codes on a GPU computes the moments a
    half at a time (the elements of even and of odd index, each from its own half of every
    byte), which lets XLA write the codes over the old ones in place. Run here, its codes,
    scales and update are bit for bit those of the moments computed whole, for both storages
    (rank-1 rows and columns, a vector's blocks, a 3-D leaf, blocks of several rows) and with
    a float32 second moment beside a 4-bit first one."""
    from tests.test_quantization import _stepped_off_cpu

    storages = adam_jax.four_bit_moments()
    if mu_only:
        storages = {"mu_dtype": storages["mu_dtype"]}
    tx = adam_jax.adamw(1e-2, b1=0.8, **storages)
    params = {"w": jax.random.normal(jax.random.key(0), shape)}
    grads = [{"w": 10.0 ** (i - 2) * jax.random.normal(jax.random.key(i), shape)} for i in (1, 2)]
    state = jax.jit(tx.update)(grads[0], tx.init(params), params)[1]

    spy = mock.patch.object(
        qz.FourBitBlockwise, "store_halves", autospec=True,
        side_effect=qz.FourBitBlockwise.store_halves,
    )  # fmt: skip
    with spy as halves:
        half_update, half_state = _stepped_off_cpu(tx, grads[1], state, params)
    assert halves.call_count == 1
    whole = [
        mock.patch.object(kind, "in_halves", return_value=False)
        for kind in (qz.FourBitBlockwise, qz.FourBitRank1)
    ]
    with whole[0], whole[1]:
        whole_update, whole_state = _stepped_off_cpu(tx, grads[1], state, params)
    np.testing.assert_array_equal(half_update["w"], whole_update["w"])
    for half, whole_leaf in zip(
        jax.tree.leaves(half_state), jax.tree.leaves(whole_state), strict=True
    ):
        np.testing.assert_array_equal(half, whole_leaf)


@pytest.mark.parametrize("shape", [(3072, 8), (768, 6), (4, 96, 5), (17, 3), (8192, 3), (1000, 4)])
def test_column_maxima_by_runs_of_rows_are_the_column_maxima(shape) -> None:
    """A GPU's first pass takes a second moment's column maxima over runs of rows first (a
    divisor of the rows, at most 32), then over the runs' maxima: the same maxima, infinities
    included, as one reduction (which it keeps below 8 rows a run and from 8192 rows)."""
    x = np.array(jax.random.normal(jax.random.key(0), shape), np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[5, 0], flat[-1, 1] = np.inf, -np.inf
    flat[:, -1] = -0.0
    expected = np.asarray(four_bit.column_maxima(jnp.asarray(x)))
    got = np.asarray(jax.jit(four_bit.column_maxima_by_runs)(jnp.asarray(x)))
    in_runs = "optimization_barrier" in str(jax.make_jaxpr(four_bit.column_maxima_by_runs)(x))
    assert in_runs == (flat.shape[0] < 8192)
    assert got.shape == (1,) * (len(shape) - 1) + shape[-1:]
    np.testing.assert_array_equal(got, expected)
    assert np.isinf(got.reshape(-1)[:2]).all()


@pytest.mark.parametrize("second", ["factored", "adam_mini"])
def test_a_4_bit_first_moment_beside_a_reducing_second_keeps_the_whole_moments(second) -> None:
    """Where the leaf's other moment is reduced (factored rows and columns, Adam-mini's block
    means), the GPU's packing kernel computes the moments whole, not a half at a time: a reduced
    moment is not laid out element by element. Traced and run here through the GPU's branch,
    the step takes the whole moments' path and matches the CPU's one pass."""
    from tests.test_quantization import _stepped_off_cpu

    shape = (1024, 768)
    mu = adam_jax.four_bit_moments()["mu_dtype"]
    if second == "factored":
        tx = adam_jax.adam(1e-2, mu_dtype=mu, nu_dtype=adam_jax.factored_second_moment(128))
    else:
        tx = adam_jax.adam_mini(1e-2, weight_decay=0.0, mu_dtype=mu)
    params = {"w": jax.random.normal(jax.random.key(0), shape)}
    grads = {"w": 0.1 * jax.random.normal(jax.random.key(1), shape)}
    state = jax.jit(tx.update)(grads, tx.init(params), params)[1]
    spy = mock.patch.object(
        qz.FourBitBlockwise, "store_halves", autospec=True,
        side_effect=qz.FourBitBlockwise.store_halves,
    )  # fmt: skip
    with spy as halves:
        gpu_update, _ = _stepped_off_cpu(tx, grads, state, params)
    assert halves.call_count == 0
    cpu_update, _ = jax.jit(tx.update)(grads, state, params)
    np.testing.assert_allclose(gpu_update["w"], cpu_update["w"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("spec", [("x", "y"), (None, "x")])
def test_codes_packed_a_half_at_a_time_on_sharded_params(spec) -> None:
    """The GPU's halves under a plain ``jax.jit`` of params, gradients and state split over a
    mesh (the last axis too, where the halves slice every other element): the same codes,
    scales and update, bit for bit, as on one device."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from tests.test_quantization import _stepped_off_cpu

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
    sharding = NamedSharding(mesh, PartitionSpec(*spec))
    shape = (2048, 256)
    tx = adam_jax.adamw(1e-2, b1=0.8, **adam_jax.four_bit_moments())
    params = {"w": jax.random.normal(jax.random.key(0), shape)}
    grads = [{"w": 10.0 ** (i - 2) * jax.random.normal(jax.random.key(i), shape)} for i in (1, 2)]
    state = jax.jit(tx.update)(grads[0], tx.init(params), params)[1]
    expected = _stepped_off_cpu(tx, grads[1], state, params)

    def split(tree):
        return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)

    def laid_out(x):  # a state array split as its param where its axes divide
        if np.ndim(x) != 2:
            return x
        axes = [
            a if a is None or n % mesh.shape[a] == 0 else None
            for a, n in zip(spec, x.shape, strict=True)
        ]
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*axes)))

    state = jax.tree.map(laid_out, state)
    assert state[0].mu["w"].codes.sharding.spec == sharding.spec
    spy = mock.patch.object(
        qz.FourBitRank1, "store_halves", autospec=True, side_effect=qz.FourBitRank1.store_halves
    )
    with spy as halves:
        got = _stepped_off_cpu(tx, split(grads[1]), state, split(params))
    assert halves.call_count == 1
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
