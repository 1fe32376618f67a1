"""Tests of the 8-bit block-wise quantized moment storage (adam_jax.quantization)."""

from __future__ import annotations

from typing import Any
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adam_jax
from adam_jax import quantization as qz
from adam_jax._src.quantization import blocks
from adam_jax._src.quantization.dynamic_map import decode, encode

# float32 rounding of x / absmax can push the error a few ulps past the exact bound.
_REL_SLACK = 1e-5


def _roundtrip(x, signed=True, block_size=256):
    q = qz.quantize_blockwise(x, block_size=block_size, signed=signed)
    return q, qz.dequantize_blockwise(q, signed=signed)


def _blocks(a, scale_shape):
    """NumPy reference of the layout: ``a`` split in tiles over its last two axes (the last one
    for a vector), ``scale_shape`` tiles per axis, padded with zeros; the tile elements come
    last, flattened: shape ``scale_shape + (tile size,)``."""
    a = np.asarray(a, np.float64)
    k = min(a.ndim, 2)
    lead, trailing, counts = a.shape[:-k], a.shape[-k:], scale_shape[-k:]
    tiles = [-(-n // c) for n, c in zip(trailing, counts, strict=True)]
    padding = [c * t - n for n, c, t in zip(trailing, counts, tiles, strict=True)]
    pad = [(0, 0)] * len(lead) + [(0, p) for p in padding]
    split = sum(((c, t) for c, t in zip(counts, tiles, strict=True)), ())
    b = np.pad(a, pad).reshape(lead + split)
    b = np.moveaxis(b, [len(lead) + 2 * i + 1 for i in range(k)], range(-k, 0))
    return b.reshape(tuple(scale_shape) + (-1,))


def _block_max(a, scale_shape):
    return _blocks(np.abs(np.asarray(a, np.float64)), scale_shape).max(axis=-1)


def _scale_of_each_element(absmax, shape):
    """Each element's block scale, shaped like the tensor (inverse of the tiling)."""
    absmax = np.asarray(absmax)
    k = min(len(shape), 2)
    for axis in range(len(shape) - k, len(shape)):
        tile = -(-shape[axis] // absmax.shape[axis])
        absmax = np.repeat(absmax, tile, axis=axis).take(range(shape[axis]), axis=axis)
    return absmax


# ---------------------------------------------------------------------------- the map


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_layout(signed):
    m = qz.create_dynamic_map(signed)
    assert m.shape == (256,) and m.dtype == np.float32
    assert np.all(np.diff(m) > 0), "entries must be sorted and distinct"
    assert (m == 0).sum() == 1 and (m == 1).sum() == 1
    assert m.max() == 1.0
    if signed:
        assert (m < 0).sum() == 127 and (m > 0).sum() == 128
        # Seven decades of dynamic range, as in the paper.
        assert np.min(np.abs(m[m != 0])) < 1e-6
    else:
        assert m.min() == 0.0
        assert np.min(m[m != 0]) < 1e-6
    # Relative precision in the top decade ~ 1/64 (signed) or 1/128 (unsigned) of the range.
    expected_gap = 0.9 / (64 if signed else 128)
    np.testing.assert_allclose(np.diff(m[m > 0.1]).max(), expected_gap, rtol=1e-5)


def test_max_quantization_error_values():
    assert qz.max_quantization_error(True) == pytest.approx(0.9 / 128, rel=1e-5)
    assert qz.max_quantization_error(False) == pytest.approx(0.9 / 256, rel=1e-5)


@pytest.mark.parametrize("signed", [True, False])
def test_encode_is_nearest_entry(signed):
    # The arithmetic encoder equals a search for the nearest map entry over the float32
    # midpoints (ties to the lower entry), on random values over many decades, on the map
    # entries, on the midpoints and their neighbours up to 3 ulps, and on the powers of ten
    # (decade boundaries) and their neighbours.
    q = qz.create_dynamic_map(signed).astype(np.float64)
    mid = ((q[:-1] + q[1:]) / 2).astype(np.float32)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1 if signed else 0, 1, 50_000) * 10.0 ** rng.uniform(-9, 0, 50_000)
    powers = (10.0 ** np.arange(-8, 1)).astype(np.float32)
    anchors = np.concatenate([q.astype(np.float32), mid, powers])
    ulps = [anchors]
    up, down = anchors, anchors
    for _ in range(3):
        up, down = np.nextafter(up, np.float32(2)), np.nextafter(down, np.float32(-2))
        ulps += [up, down]
    specials = np.concatenate(ulps + [[0.0, -0.0, 1.0, 1e-30, 1e-45, 1e-7, 1e-6]])
    specials = specials[np.abs(specials) <= 1].astype(np.float32)
    if signed:
        specials = np.concatenate([specials, -specials, [-1.0]]).astype(np.float32)
    x = np.concatenate([x.astype(np.float32), specials])
    if not signed:
        x = np.abs(x)
    expected = np.searchsorted(mid, x, side="left")  # number of midpoints strictly below x
    got = np.asarray(jax.jit(lambda v: encode(v, signed))(jnp.asarray(x)))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("signed", [True, False])
def test_decode_is_the_map(signed):
    codes = jnp.arange(256, dtype=jnp.uint8)
    got = np.asarray(jax.jit(lambda c: decode(c, signed))(codes))
    np.testing.assert_array_equal(got, qz.create_dynamic_map(signed))


@pytest.mark.parametrize("signed", [True, False])
def test_codec_has_no_gather(signed):
    """Encoding and decoding are elementwise arithmetic: no gather (table lookup) in the step."""
    x = jnp.linspace(-1.0, 1.0, 4096).reshape(16, 256)
    if not signed:
        x = jnp.abs(x)

    def roundtrip(v):
        return qz.dequantize_blockwise(qz.quantize_blockwise(v, signed=signed), signed=signed)

    jaxpr = str(jax.make_jaxpr(roundtrip)(x))
    assert "gather" not in jaxpr and "dynamic_slice" not in jaxpr


@pytest.mark.parametrize("signed", [True, False])
def test_the_codec_reads_no_float_bits(signed):
    """Encoding converts the exact integer code, not the mantissa bits of code + 2**23, and
    decoding finds a rank's leading power of two by comparisons, not from its exponent bits:
    compiled by XLA:GPU (jax 0.11.2, an H200, 2026-11-28), encode's bitcast gave every signed
    code 255 on a grid of [-1, 1] and on most 8-bit leaves, where the CPU was right
    (benchmarks/results/gpu_codes_h200.json)."""
    encoded = jax.make_jaxpr(lambda v: encode(v, signed))(jnp.linspace(-1.0, 1.0, 64))
    decoded = jax.make_jaxpr(lambda c: decode(c, signed))(jnp.arange(256, dtype=jnp.uint8))
    assert "bitcast_convert_type" not in str(encoded) + str(decoded)


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(
    ("shape", "scale_shape"),
    [
        ((4096,), (16,)),  # runs of 256
        ((300, 257), (300, 2)),  # two runs of 129 per row (the last one padded)
        ((3, 5, 7, 11), (3, 5, 1, 1)),  # a row of 11 fits 23 times: blocks of all 7 rows
        ((96, 40), (16, 1)),  # blocks of 6 rows (the largest divisor of 96 up to 256 // 40)
    ],
)
def test_roundtrip_error_bound_per_block(signed, shape, scale_shape):
    x = jax.random.normal(jax.random.key(1), shape) * 3.0
    if not signed:
        x = x**2
    q, d = _roundtrip(x, signed)
    assert q.codes.shape == x.shape and q.codes.dtype == jnp.uint8
    assert q.absmax.shape == scale_shape and q.absmax.dtype == jnp.float32
    err_block_max = _block_max(np.asarray(x, np.float64) - np.asarray(d), scale_shape)
    bound = np.asarray(q.absmax) * qz.max_quantization_error(signed) * (1 + _REL_SLACK)
    assert np.all(err_block_max <= bound)
    # And the bound is not vacuous: the error really is of that order somewhere.
    assert err_block_max.max() > 0.1 * bound.max()
    # absmax is exactly the block maximum of |x|, and dequantization is absmax * map[code].
    np.testing.assert_array_equal(np.asarray(q.absmax), _block_max(x, scale_shape))
    qmap = qz.create_dynamic_map(signed)
    expected = _scale_of_each_element(q.absmax, shape) * qmap[np.asarray(q.codes)]
    np.testing.assert_array_equal(np.asarray(d), expected.astype(np.float32))


@settings(max_examples=15, deadline=None)
@given(
    data=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=700),
    block_size=st.sampled_from([1, 3, 64, 256]),
)
def test_roundtrip_error_bound_property(data, block_size):
    x = np.asarray(data, np.float32)
    q, d = _roundtrip(x, True, block_size)
    # A vector is cut into ceil(n / block_size) runs of equal length.
    assert q.absmax.shape == (-(-x.size // block_size),)
    err = _block_max(x.astype(np.float64) - np.asarray(d), q.absmax.shape)
    bound = np.asarray(q.absmax) * qz.max_quantization_error(True) * (1 + _REL_SLACK)
    assert np.all(err <= bound + 1e-30)
    # Signs are never flipped: a value is kept with its sign or rounded to zero.
    d = np.asarray(d)
    assert np.all(np.sign(d) * np.sign(x) >= 0)


def test_exact_zeros_and_block_maxima():
    x = np.zeros(1024, np.float32)
    x[300:600] = np.linspace(-5, 7, 300)
    x[700] = -2.5
    q, d = _roundtrip(jnp.asarray(x), True)
    d = np.asarray(d)
    zeros = x == 0
    assert np.all(d[zeros] == 0.0), "zeros must be reproduced exactly"
    # An all-zero block has absmax 0 and decodes to exact zeros (no NaN from 0/0).
    assert np.asarray(q.absmax)[0] == 0.0 and np.all(np.isfinite(d))
    # The largest positive element of a block is reproduced exactly (1.0 is in the map).
    assert d[599] == x[599] == 7.0


def test_all_zero_tensor_and_unsigned_zero():
    for signed in (True, False):
        q, d = _roundtrip(jnp.zeros((64, 128)), signed)
        assert np.all(np.asarray(d) == 0.0)
        assert np.all(np.asarray(q.absmax) == 0.0)


@pytest.mark.parametrize("signed", [True, False])
def test_sign_preservation(signed):
    x = jax.random.normal(jax.random.key(2), (8192,)) * jnp.logspace(-8, 3, 8192)
    if not signed:
        x = jnp.abs(x)
    _, d = _roundtrip(x, signed)
    x, d = np.asarray(x), np.asarray(d)
    assert np.all(np.sign(d) * np.sign(x) >= 0)
    if signed:
        # Values not much smaller than their block max keep their sign (are not flushed to 0).
        big = np.abs(x) >= 1e-5 * _scale_of_each_element(_block_max(x, (32,)), x.shape)
        assert np.all(np.sign(d[big]) == np.sign(x[big]))
    else:
        assert np.all(d >= 0)


def test_outlier_block_does_not_affect_other_blocks():
    x = np.asarray(jax.random.normal(jax.random.key(3), (16 * 256,)), np.float32)
    q0, d0 = _roundtrip(jnp.asarray(x), True)
    y = x.copy()
    y[5 * 256 + 17] = 1e6  # an outlier in block 5
    q1, d1 = _roundtrip(jnp.asarray(y), True)
    d0, d1 = np.asarray(d0), np.asarray(d1)
    other = np.ones(x.size, bool)
    other[5 * 256 : 6 * 256] = False
    np.testing.assert_array_equal(d0[other], d1[other])
    np.testing.assert_array_equal(np.asarray(q0.codes)[other], np.asarray(q1.codes)[other])
    assert np.asarray(q1.absmax)[5] == 1e6
    # Inside the outlier's block the others lose precision (bounded by 1e6 * max error)...
    err = np.abs(d1[5 * 256 : 6 * 256] - y[5 * 256 : 6 * 256])
    assert err.max() <= 1e6 * qz.max_quantization_error(True) * (1 + _REL_SLACK)
    # ...but the other blocks keep the tight per-block bound.
    err_other = np.abs(d1[other] - y[other]).max()
    assert err_other <= np.abs(x).max() * qz.max_quantization_error(True) * (1 + _REL_SLACK)


def test_dynamic_range_relative_error():
    # Within one block, values spanning 5 decades keep a bounded relative error (dynamic map),
    # whereas a linear 8-bit map would flush everything below absmax/255 to zero.
    x = jnp.asarray(np.logspace(-5, 0, 256, dtype=np.float32))
    _, d = _roundtrip(x, False)
    rel = np.abs(np.asarray(d) - np.asarray(x)) / np.asarray(x)
    assert rel.max() < 0.3
    assert rel[np.asarray(x) >= 1e-2].max() < 0.08
    assert np.all(np.asarray(d) > 0)


def test_jit_and_dtypes():
    x = jax.random.normal(jax.random.key(4), (513, 17)).astype(jnp.bfloat16)
    q = jax.jit(lambda a: qz.quantize_blockwise(a, signed=True))(x)
    d_jit = jax.jit(lambda c: qz.dequantize_blockwise(c, signed=True))(q)
    q2, d = _roundtrip(x, True)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(q2.codes))
    np.testing.assert_array_equal(np.asarray(d_jit), np.asarray(d))
    assert d.dtype == jnp.float32
    dd = qz.dequantize_blockwise(q, signed=True, dtype=jnp.bfloat16)
    assert dd.dtype == jnp.bfloat16
    with pytest.raises(TypeError):
        qz.quantize_blockwise(jnp.ones(8, jnp.complex64))


# ---------------------------------------------------------------------------- storage


def test_storage_init_load_store_shapes_and_small_tensors():
    s = qz.BlockwiseQuantized(signed=True)
    big = jnp.ones((64, 100), jnp.bfloat16)  # 6400 >= 4096 elements: quantized
    small = jnp.ones((63, 65), jnp.float32)  # 4095 elements: float32
    st_big = s.init(big)
    assert isinstance(st_big, qz.QuantizedArray)
    assert st_big.codes.shape == (64, 100) and st_big.codes.dtype == jnp.uint8
    assert st_big.absmax.shape == (32, 1)  # blocks of two rows of 100
    assert np.all(np.asarray(s.load(st_big)) == 0.0)
    st_small = s.init(jax.ShapeDtypeStruct(small.shape, jnp.bfloat16))
    assert st_small.dtype == jnp.float32 and st_small.shape == small.shape
    # Small tensors are stored exactly (float32).
    v = jax.random.normal(jax.random.key(5), small.shape)
    np.testing.assert_array_equal(np.asarray(s.load(s.store(v, st_small))), np.asarray(v))
    # Big ones go through the codec, with same structure / shapes / dtypes as before.
    v = jax.random.normal(jax.random.key(6), big.shape)
    new = s.store(v, st_big)
    assert jax.tree.structure(new) == jax.tree.structure(st_big)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new) == jax.tree.map(
        lambda a: (a.shape, a.dtype), st_big
    )
    np.testing.assert_array_equal(
        np.asarray(s.load(new)),
        np.asarray(qz.dequantize_blockwise(qz.quantize_blockwise(v))),
    )


def test_storage_validation_and_equality():
    with pytest.raises(ValueError, match="block_size"):
        qz.BlockwiseQuantized(block_size=0)
    assert qz.BlockwiseQuantized() == qz.BlockwiseQuantized()
    assert qz.BlockwiseQuantized(signed=False) != qz.BlockwiseQuantized()
    assert "signed=False" in repr(qz.BlockwiseQuantized(signed=False))
    kw = qz.eight_bit_moments()
    assert kw["mu_dtype"].signed and not kw["nu_dtype"].signed


def test_state_bytes_per_parameter():
    params = {"w": jnp.zeros((1024, 1024)), "b": jnp.zeros((1024,))}
    n = 1024 * 1024 + 1024
    f32 = adam_jax.scale_by_adam().init(params)
    q8 = adam_jax.scale_by_adam(**qz.eight_bit_moments()).init(params)
    bf16 = adam_jax.scale_by_adam(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16).init(params)
    assert adam_jax.state_bytes(f32) / n == pytest.approx(8.0, abs=0.01)
    assert adam_jax.state_bytes(bf16) / n == pytest.approx(4.0, abs=0.01)
    per_param = adam_jax.state_bytes(q8) / n
    assert per_param <= 2.1
    assert per_param == pytest.approx(2 * (1 + 4 / 256), abs=0.02)
    # Short rows (a conv kernel with 64 output channels) group into blocks of 4 rows: the same.
    kernel = jnp.zeros((3, 3, 64, 64))
    q8 = adam_jax.scale_by_adam(**qz.eight_bit_moments()).init(kernel)
    assert q8.mu.absmax.shape == (3, 3, 16, 1)
    assert adam_jax.state_bytes(q8) / kernel.size == pytest.approx(2 * (1 + 4 / 256), abs=1e-3)


def test_state_bytes_lives_at_the_top_level_only():
    """0.3's ``adam_jax.quantization.state_bytes`` is gone (CHANGELOG lists the moves)."""
    assert "state_bytes" not in qz.__all__
    with pytest.raises(AttributeError):
        qz.state_bytes  # noqa: B018


def test_scales_of_another_rank_are_refused():
    """A state with one flat row of scales (the layout before blocks followed the axes) is
    refused rather than decoded with the wrong blocks."""
    old = qz.QuantizedArray(codes=jnp.zeros((64, 80), jnp.uint8), absmax=jnp.ones((20,)))
    with pytest.raises(ValueError, match="rank"):
        qz.dequantize_blockwise(old)
    with pytest.raises(ValueError, match="rank"):
        qz.BlockwiseQuantized().store(jnp.ones((64, 80)), old)


# ---------------------------------------------------------------------------- with Adam


def test_adam_8bit_converges_like_float32_on_quadratic():

    key = jax.random.key(7)
    k1, k2 = jax.random.split(key)
    # An ill-conditioned quadratic with 16384 + 64 parameters (one quantized leaf, one not).
    target = {"w": jax.random.normal(k1, (128, 128)), "b": jax.random.normal(k2, (64,))}
    scales = {"w": jnp.logspace(-2, 1, 128 * 128).reshape(128, 128), "b": jnp.ones(64)}

    def loss(p):
        return sum(
            jnp.sum(s * (a - t) ** 2)
            for a, t, s in zip(
                jax.tree.leaves(p), jax.tree.leaves(target), jax.tree.leaves(scales), strict=True
            )
        )

    def run(opt, steps=300):
        params = jax.tree.map(jnp.zeros_like, target)
        state = opt.init(params)

        @jax.jit
        def step(params, state):
            g = jax.grad(loss)(params)
            u, state = opt.update(g, state, params)
            return optax.apply_updates(params, u), state

        for _ in range(steps):
            params, state = step(params, state)
        return params, state

    p32, _ = run(adam_jax.adam(0.05))
    p8, s8 = run(adam_jax.adam(0.05, **qz.eight_bit_moments()))
    l0 = float(loss(jax.tree.map(jnp.zeros_like, target)))
    l32, l8 = float(loss(p32)), float(loss(p8))
    assert l32 < 1e-2 * l0
    assert l8 < 1e-2 * l0, (l0, l32, l8)
    assert l8 < 3 * l32 + 1e-3 * l0
    # The state really is quantized for the big leaf, float32 for the small one.
    inner = s8[0] if isinstance(s8, tuple) and not hasattr(s8, "mu") else s8
    found = [x for x in jax.tree.leaves(inner) if x.dtype == jnp.uint8]
    assert len(found) == 2 and all(x.shape == (128, 128) for x in found)
    # Parameters close to float32-moment parameters.
    np.testing.assert_allclose(np.asarray(p8["b"]), np.asarray(p32["b"]), atol=0.05)


def test_adam_8bit_with_weight_decay_mask_and_donation():

    params = {"w": jnp.ones((64, 128)), "b": jnp.ones((128,))}
    opt = adam_jax.adamw(
        1e-2, weight_decay=0.1, mask={"w": True, "b": False}, **qz.eight_bit_moments()
    )
    state = opt.init(params)

    def raw_step(params, state, g):
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

    step = jax.jit(raw_step)
    step_d = jax.jit(raw_step, donate_argnums=(0, 1))
    g = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    p_a, s_a = step(params, state, g)
    p_b, s_b = step_d(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state), g)
    for a, b in zip(jax.tree.leaves((p_a, s_a)), jax.tree.leaves((p_b, s_b)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # First Adam step is -lr * sign(g) (+ decay on w only) whatever the storage.
    np.testing.assert_allclose(np.asarray(p_a["b"]), 1 - 1e-2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(p_a["w"]), 1 - 1e-2 * (1 + 0.1), rtol=1e-6)


@pytest.mark.parametrize("alias", ["adamw", "nadamw", "amsgrad", "adam_l2", "adamax"])
def test_8bit_moments_compose_with_core_aliases(alias):

    params = {"w": jnp.linspace(-2.0, 2.0, 64 * 128).reshape(64, 128), "b": jnp.ones(10)}
    kw = qz.eight_bit_moments()
    make = {
        "adamw": lambda **k: adam_jax.adamw(0.05, weight_decay=0.1, **k),
        "nadamw": lambda **k: adam_jax.nadamw(0.05, weight_decay=0.1, **k),
        "amsgrad": lambda **k: adam_jax.amsgrad(0.05, **k),
        "adam_l2": lambda **k: adam_jax.adam_l2(0.05, weight_decay=0.1, **k),
        "adamax": lambda **k: optax.chain(
            adam_jax.scale_by_adamax(mu_dtype=k.get("mu_dtype")),
            adam_jax.scale_by_learning_rate(0.05),
        ),
    }[alias]

    def run(opt, steps=30):
        p, state = params, opt.init(params)

        @jax.jit
        def step(p, state):
            g = jax.grad(lambda q: sum(jnp.sum((x - 0.5) ** 2) for x in jax.tree.leaves(q)))(p)
            u, state = opt.update(g, state, p)
            return optax.apply_updates(p, u), state

        for _ in range(steps):
            p, state = step(p, state)
        return p, state

    p32, _ = run(make())
    p8, s8 = run(make(**kw))
    assert any(x.dtype == jnp.uint8 for x in jax.tree.leaves(s8))
    # 30 steps of lr 0.05 move params by up to 1.5; 8-bit moments stay within a few % of it.
    np.testing.assert_allclose(np.asarray(p8["w"]), np.asarray(p32["w"]), atol=0.05)
    np.testing.assert_array_equal(np.asarray(p8["b"]), np.asarray(p32["b"]))  # float32 leaf


def test_eight_bit_moments_in_flax_nnx_optimizer() -> None:
    """nnx.Optimizer rebuilds the stored QuantizedArray as an nnx.State; the storage reads it and
    writes back the same kind of container, so training works eagerly and as a lax.scan carry."""
    from flax import nnx

    model = nnx.Linear(64, 96, rngs=nnx.Rngs(0))
    storage = qz.eight_bit_moments(min_size=1024)
    optimizer = nnx.Optimizer(model, adam_jax.adam(1e-2, **storage), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (32, 64))
    y = jnp.tile(x, (1, 2))[:, :96]

    def loss_fn(m: nnx.Linear) -> jax.Array:
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def step(m: nnx.Linear, opt: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    eager = [float(step(model, optimizer)) for _ in range(3)]
    assert eager[2] < eager[1] < eager[0]
    kernel_mu = optimizer.opt_state[0].mu["kernel"].get_value()
    assert kernel_mu.codes.dtype == jnp.uint8 and kernel_mu.absmax.dtype == jnp.float32

    graphdef, state = nnx.split((model, optimizer))

    def body(carry: nnx.State, _: None) -> tuple[nnx.State, jax.Array]:
        m, opt = nnx.merge(graphdef, carry)
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return nnx.state((m, opt)), loss

    _, scanned = jax.lax.scan(body, state, None, length=3)
    assert scanned[2] < scanned[0] < eager[2]


def _stepped_off_cpu(
    tx: optax.GradientTransformation, grads: Any, state: Any, params: Any, platform: str = "cuda"
) -> Any:
    """``tx.update`` jitted on the CPU as it runs on ``platform``: every ``platform_dependent``
    takes that platform's branch, else its default (on a GPU, an 8-bit leaf of at least
    ``TWO_PASSES_MIN_SIZE`` in two passes)."""

    chosen = []

    def elsewhere(*operands: Any, default: Any, **platforms: Any) -> Any:
        branch = platforms.get(platform, default)
        chosen.append(branch)
        return branch(*operands)

    with mock.patch.object(jax.lax, "platform_dependent", elsewhere):
        # A function of its own: jit's cache would give back the CPU's trace of tx.update.
        stepped = jax.jit(lambda g, s, p: tx.update(g, s, p))(grads, state, params)
    assert chosen, "no platform_dependent branch was traced"
    return stepped


@pytest.mark.parametrize("shape", [(1024, 520), (1 << 19,), (2048, 256)])
def test_two_passes_encode_what_one_pass_does(shape):
    """Off the CPU a large 8-bit leaf is stepped in two passes: the block maxima of the new
    moments first, then the moments again, encoded over them. Run here, its scales are one
    pass's to XLA's contraction of the moving average (an ulp), its codes within one step, and
    its update one pass's to float32 rounding."""
    assert np.prod(shape) >= blocks.TWO_PASSES_MIN_SIZE
    tx = adam_jax.adamw_8bit(1e-2, b1=0.8)
    params = {"w": jax.random.normal(jax.random.key(0), shape)}
    grads = [{"w": 10.0 ** (i - 2) * jax.random.normal(jax.random.key(i), shape)} for i in (1, 2)]
    state = tx.init(params)
    state = jax.jit(tx.update)(grads[0], state, params)[1]  # moments of every size

    one_update, one_state = jax.jit(tx.update)(grads[1], state, params)
    two_update, two_state = _stepped_off_cpu(tx, grads[1], state, params)
    for name in ("mu", "nu"):
        one, two = getattr(one_state[0], name)["w"], getattr(two_state[0], name)["w"]
        np.testing.assert_allclose(two.absmax, one.absmax, rtol=3e-7, atol=0)
        steps = np.abs(np.asarray(two.codes, np.int32) - np.asarray(one.codes, np.int32))
        assert steps.max() <= 1, name
        assert (steps > 0).mean() < 1e-3, name
    np.testing.assert_allclose(two_update["w"], one_update["w"], rtol=1e-5, atol=1e-12)


def _unpacked_codes(stored: Any) -> np.ndarray:
    """Codes as integers, one an element (4-bit codes unpacked, the padding nibble kept)."""
    codes = np.asarray(stored.codes).astype(np.int32)
    if isinstance(stored, (qz.PackedQuantizedArray, qz.Rank1QuantizedArray)):
        return np.stack([codes & 15, codes >> 4], axis=-1)
    return codes


@pytest.mark.parametrize("moments", ["8-bit", "4-bit"])
@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto])
def test_both_passes_keep_a_sharded_leaf_sharded(moments, axis_type):
    """A leaf split over a 2 x 4 mesh (rows and columns: 768 columns in shards of 192, which
    blocks of 256 straddle under Auto axes; with Explicit axes the blocks follow the shards).
    Two passes: the one pass's update to float32 rounding, its codes within one step. Both:
    every state array placed where ``init`` placed it (one pass, encoding in the blocks' shape,
    left the codes whole along the columns under Auto axes: 4x their bytes on each device)."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
    storages = adam_jax.eight_bit_moments() if moments == "8-bit" else adam_jax.four_bit_moments()
    tx = adam_jax.adamw(1e-2, b1=0.8, **storages)
    shape = (1024, 768)
    with jax.set_mesh(mesh):
        params = {"w": jax.device_put(jax.random.normal(jax.random.key(0), shape), sharding)}
        grads = [
            {"w": jax.device_put(10.0 ** (i - 2) * jax.random.normal(jax.random.key(i), shape),
                                 sharding)}
            for i in (1, 2)
        ]  # fmt: skip
        placed = tx.init(params)
        state = jax.jit(tx.update)(grads[0], placed, params)[1]
        one_update, one_state = jax.jit(tx.update)(grads[1], state, params)
        two_update, two_state = _stepped_off_cpu(tx, grads[1], state, params)
    np.testing.assert_allclose(two_update["w"], one_update["w"], rtol=1e-5, atol=1e-12)
    assert two_update["w"].sharding.is_equivalent_to(one_update["w"].sharding, 2)
    for new_state in (one_state, two_state):
        for init, new in zip(jax.tree.leaves(placed), jax.tree.leaves(new_state), strict=True):
            assert new.sharding.is_equivalent_to(init.sharding, init.ndim)
    for name in ("mu", "nu"):
        one, two = getattr(one_state[0], name)["w"], getattr(two_state[0], name)["w"]
        steps = np.abs(_unpacked_codes(two) - _unpacked_codes(one))
        assert steps.max() <= 1 and (steps > 0).mean() < 1e-3, name


@pytest.mark.parametrize("moments", ["8-bit", "4-bit"])
def test_a_tpu_steps_in_one_pass(moments):
    """A TPU keeps the CPU's one pass (its two passes' kernels move more bytes): bit for bit."""
    storages = adam_jax.eight_bit_moments() if moments == "8-bit" else adam_jax.four_bit_moments()
    tx = adam_jax.adamw(1e-2, b1=0.8, **storages)
    shape = (1024, 520)
    assert np.prod(shape) >= blocks.TWO_PASSES_MIN_SIZE
    params = {"w": jax.random.normal(jax.random.key(0), shape)}
    grads = {"w": jax.random.normal(jax.random.key(1), shape)}
    state = jax.jit(tx.update)(grads, tx.init(params), params)[1]  # moments to average
    grads = {"w": 0.1 * jax.random.normal(jax.random.key(2), shape)}
    on_cpu = jax.jit(tx.update)(grads, state, params)
    chex.assert_trees_all_equal(on_cpu, _stepped_off_cpu(tx, grads, state, params, "tpu"))


def test_small_leaves_and_schedules_step_in_one_pass():
    """Below ``TWO_PASSES_MIN_SIZE``, and under ``step_in_slices`` and ``offload_state``, the
    default branch is the one pass of the CPU: bit for bit."""
    shape = (1024, 520)
    params = {"w": jax.random.normal(jax.random.key(0), shape), "s": jnp.ones((64, 128))}
    grads = {"w": jax.random.normal(jax.random.key(1), shape), "s": jnp.ones((64, 128))}
    for tx in (
        adam_jax.step_in_slices(adam_jax.adamw_8bit(1e-2), max_elements=1 << 17),
        adam_jax.offload_state(adam_jax.adamw_8bit(1e-2)),
    ):
        state = tx.init(params)
        on_cpu = jax.jit(tx.update)(grads, state, params)
        elsewhere = _stepped_off_cpu(tx, grads, state, params)
        chex.assert_trees_all_equal(on_cpu, elsewhere)
    tx = adam_jax.adamw_8bit(1e-2)
    state = tx.init(params)
    one, two = jax.jit(tx.update)(grads, state, params), _stepped_off_cpu(tx, grads, state, params)
    chex.assert_trees_all_equal(one[1][0].mu["s"], two[1][0].mu["s"])
