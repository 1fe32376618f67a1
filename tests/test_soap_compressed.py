"""SOAP with compressed state: its factors (``factor_dtype``), eigenbases (``basis_dtype``,
decoded and rectified by Björck orthonormalization) and moments (``mu_dtype``,
``nu_dtype``) in the family's storages."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax
from adam_jax._src.quantization import blocks
from adam_jax._src.variants.soap import SoapLayout, _rectify, bjorck_iterations
from adam_jax.quantization import BlockwiseQuantized, FourBitBlockwise, FourBitRank1

EIGHT_BIT = BlockwiseQuantized(min_size=0)  # the small test leaves quantized too


def _params() -> dict[str, jax.Array]:
    return {
        "w": jax.random.normal(jax.random.key(1), (96, 80)),
        "b": jnp.zeros(80),
    }


def _run(tx: optax.GradientTransformation, params: Any, steps: int = 5) -> tuple[Any, Any]:
    state, step = tx.init(params), jax.jit(tx.update)
    updates = params
    for i in range(steps):
        grads = jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)) + 0.1, params)
        updates, state = step(grads, state, params)
    return updates, state


def _bytes(**options: Any) -> int:
    tx = adam_jax.soap(3e-3, **options)
    return adam_jax.state_bytes(jax.eval_shape(tx.init, _params()))


@pytest.mark.parametrize(
    "storages",
    [
        {"mu_dtype": EIGHT_BIT, "nu_dtype": BlockwiseQuantized(min_size=0, signed=False)},
        adam_jax.four_bit_moments(min_size=0),
    ],
    ids=["8-bit", "4-bit"],
)
def test_mu_and_nu_take_the_families_quantized_storages(storages: dict[str, Any]) -> None:
    """``mu_dtype`` and ``nu_dtype`` as for every optimizer of the family: init, steps with
    a refresh (frequency 2, blocks of 32), finite updates, fewer bytes."""
    options = {"precondition_frequency": 2, "block_size": 32}
    tx = adam_jax.soap(3e-3, **options, **storages)
    updates, _ = _run(tx, _params())
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))
    assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))
    assert _bytes(**options, **storages) < _bytes(**options) - 2 * 96 * 80 * 2


def test_state_bytes_shrink_by_the_expected_amount() -> None:
    """Exact bytes from abstract shapes: the leaf ``w`` (96 x 80) has factors and bases of
    96^2 + 80^2 = 15616 values (4 bytes each in float32); the bias (80) has none."""
    values = 96**2 + 80**2
    base = _bytes()
    assert base == 4 + 2 * 4 * (96 * 80 + 80) + 2 * 4 * values  # count, mu and nu, gg and q
    assert base - _bytes(factor_dtype=jnp.bfloat16) == 2 * values
    assert base - _bytes(basis_dtype=jnp.bfloat16) == 2 * values
    scales = -(-values // 256)  # one float32 absmax per 256 values of the flat vector
    assert base - _bytes(basis_dtype=EIGHT_BIT) == 4 * values - (values + 4 * scales)
    four_bit = FourBitBlockwise(min_size=0)
    assert base - _bytes(basis_dtype=four_bit) == 4 * values - (values // 2 + 4 * (values // 128))
    blocked = _bytes(block_size=32)  # w: 3 x (2 x 32 + 16) blocks; 32^2 + ... per block
    blocked_values = 3 * 2 * (32 * 32 + 32 * 32) + 3 * (32 * 32 + 16 * 16)
    assert blocked - _bytes(block_size=32, factor_dtype=jnp.bfloat16) == 2 * blocked_values


def test_defaults_and_a_float32_factor_dtype_are_todays_soap_bit_for_bit() -> None:
    params = _params()
    expected, expected_state = _run(adam_jax.soap(3e-3, precondition_frequency=2), params)
    for options in ({"factor_dtype": None, "basis_dtype": None}, {"factor_dtype": jnp.float32}):
        actual, state = _run(adam_jax.soap(3e-3, precondition_frequency=2, **options), params)
        ours, todays = jax.tree.leaves((actual, state)), jax.tree.leaves((expected, expected_state))
        for a, b in zip(ours, todays, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _train(**options: Any) -> float:
    """A least-squares problem (noisy targets, ill-conditioned inputs) trained to its floor:
    200 steps of a cosine schedule from 0.1, bases refreshed every 5 steps."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (128, 32)) * jnp.logspace(0, 0.5, 32)
    y = x @ jax.random.normal(k2, (32, 16)) + 0.5 * jax.random.normal(k3, (128, 16))
    loss = lambda w: jnp.mean((x @ w - y) ** 2)  # noqa: E731
    schedule = optax.cosine_decay_schedule(0.1, 200)
    tx = adam_jax.soap(schedule, weight_decay=0.0, precondition_frequency=5, **options)

    def step(carry: Any, _: Any) -> Any:
        w, state = carry
        updates, state = tx.update(jax.grad(loss)(w), state, w)
        return (optax.apply_updates(w, updates), state), None

    w0 = jnp.zeros((32, 16))
    (w, _), _ = jax.jit(lambda w: jax.lax.scan(step, (w, tx.init(w)), length=200))(w0)
    return float(loss(w))


def test_bfloat16_factors_and_8_bit_bases_train_to_float32_soaps_loss() -> None:
    """Within 2% of float32 SOAP's final loss (itself within 10% of the least-squares
    floor, 0.197). The bound: bfloat16 rounds each factor by at most 2^-9 relative, and the
    rectified 8-bit basis is orthogonal to float32 rounding and ~3e-3 from the float32 one (a
    slightly rotated eigenbasis, in which Adam converges alike); measured 0.2% (1.7% below it
    with blocks of 8, staggered)."""
    reference = _train()
    assert reference < 0.22
    compressed = {"factor_dtype": jnp.bfloat16, "basis_dtype": EIGHT_BIT}
    assert _train(**compressed) <= 1.02 * reference
    assert _train(**compressed, block_size=8, stagger_refresh=True) <= 1.02 * reference


def test_4_bit_bases_in_blocks_train_to_float32_soaps_loss() -> None:
    """4-bit bases (rectified; the first moment moved into the basis as decoded at each
    refresh) in blocks of 8: within 2% of float32 SOAP's loss, as the 8-bit ones (measured
    within 0.2% of float32 SOAP in the same blocks)."""
    reference = _train(block_size=8)
    four_bit = {"factor_dtype": jnp.bfloat16, "basis_dtype": FourBitBlockwise(min_size=0)}
    assert _train(**four_bit, block_size=8) <= 1.02 * reference


@pytest.mark.parametrize("block_size", [128, None], ids=["blocks", "whole"])
def test_quantized_moments_of_a_leaf_at_the_two_pass_size_step_in_one_pass(
    block_size: int | None,
) -> None:
    """A leaf of at least ``TWO_PASSES_MIN_SIZE`` with 8-bit moments (GPT-2's 768 x 3072 blocks
    of 128, as the language-model program runs SOAP): jitted, compiled ahead (as a training
    step is) and stepped as on a GPU, where SOAP keeps one pass. Both passes traced the
    projections again, and a refresh's solver calls inside a branch they leaked from: jit
    raised an UnexpectedTracerError, the compiled step wanted 6 more arguments than it has."""
    from tests.test_quantization import _stepped_off_cpu

    shape = (768, 768)
    assert np.prod(shape) >= blocks.TWO_PASSES_MIN_SIZE
    tx = adam_jax.soap(3e-3, block_size=block_size, **adam_jax.eight_bit_moments())
    params = {"w": jax.random.normal(jax.random.key(0), shape)}
    grads = {"w": jax.random.normal(jax.random.key(1), shape)}
    state = tx.init(params)
    jitted = jax.jit(tx.update)(grads, state, params)
    ahead = jax.jit(tx.update).lower(grads, state, params).compile()(grads, state, params)
    as_on_gpu = _stepped_off_cpu(tx, grads, state, params)
    for a, b, c in zip(*map(jax.tree.leaves, (jitted, ahead, as_on_gpu)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("storage", [EIGHT_BIT, FourBitBlockwise(min_size=0)], ids=["8", "4"])
def test_decoded_bases_are_rectified_to_orthogonal(storage: Any) -> None:
    """A stored basis, decoded, is orthogonal to ~1e-2 (8 bits) or ~0.2 (4 bits) only
    (max |QᵀQ - I|, 64 x 64 and 48 x 48 bases after refreshes); after the step's Björck
    iterations (two; three for 4 bits), to 1e-3, and at least 20 times better than decoded."""
    params = {"w": jax.random.normal(jax.random.key(2), (64, 48))}
    tx = adam_jax.soap(3e-3, precondition_frequency=2, basis_dtype=storage)
    _, state = _run(tx, params, steps=5)
    flat = storage.load(state[0].q["w"])
    layout = SoapLayout(10000, merge_dims=False, precondition_1d=False)
    for q in layout.unpack(flat, (64, 48)):
        eye = jnp.eye(q.shape[0])
        raw = float(jnp.abs(q.T @ q - eye).max())
        rectified = _rectify(q, bjorck_iterations(storage))
        error = float(jnp.abs(rectified.T @ rectified - eye).max())
        assert raw > 2e-3
        assert error < min(1e-3, raw / 20)


@pytest.mark.parametrize("name", ["factor_dtype", "basis_dtype"])
@pytest.mark.parametrize(
    "value",
    [
        jnp.int8,
        "no such dtype",
        BlockwiseQuantized(signed=False),
        FourBitRank1(),
        adam_jax.factored_second_moment(),
        adam_jax.cast_storage(jnp.int32),
    ],
    ids=["int8", "not-a-dtype", "unsigned-8-bit", "4-bit-rank-1", "factored", "int-cast"],
)
def test_storages_soap_cannot_use_for_a_factor_are_refused_by_name(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"{name} must be None, a floating dtype"):
        adam_jax.soap(3e-3, **{name: value})


def test_a_small_transformer_keeps_at_most_12_bytes_per_param_with_real_arrays() -> None:
    """Both sides of every matrix preconditioned (``max_precond_dim`` above the vocabulary,
    blocks of 32), bfloat16 factors, 8-bit bases and moments: the bytes of the state built
    from real arrays are those of the abstract shapes, at most 12 per parameter."""
    from benchmarks.models import transformer_params

    params = transformer_params(jax.random.key(0), layers=2, d=64, ff=256, vocab=512, seq=64)
    tx = adam_jax.soap(
        3e-3,
        block_size=32,
        max_precond_dim=1024,
        factor_dtype=jnp.bfloat16,
        basis_dtype=BlockwiseQuantized(),
        **adam_jax.eight_bit_moments(),
    )
    size = sum(x.size for x in jax.tree.leaves(params))
    real = adam_jax.state_bytes(tx.init(params))
    assert real == adam_jax.state_bytes(jax.eval_shape(tx.init, params))
    assert real / size <= 12


def test_compressed_storages_under_inject_hyperparams() -> None:
    """The storages are static hyperparameters (a dtype such as ``jnp.bfloat16`` is callable,
    which ``optax.inject_hyperparams`` would take for a schedule: named in ``static_args``);
    the state keeps their forms."""
    static = ("factor_dtype", "basis_dtype")
    tx = optax.inject_hyperparams(adam_jax.soap, static_args=static)(
        learning_rate=3e-3, factor_dtype=jnp.bfloat16, basis_dtype=EIGHT_BIT
    )
    params = jnp.ones((8, 4))
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(jnp.sin(params), state, params)
    inner = state.inner_state[0]
    assert inner.gg.dtype == jnp.bfloat16 and inner.q.codes.dtype == jnp.uint8
    assert bool(jnp.isfinite(updates).all())


def test_basis_rectification_sets_the_bjorck_iterations() -> None:
    """``basis_rectification=None`` is the storage's count (two for bfloat16 bases) bit for
    bit, refreshes included (frequency 2, blocks of 32); ``0`` rotates by the decoded bases
    and one iteration lands between: the update against two iterations', relative to its size,
    on the bases of the first step (no refresh: after one, the eigenbases of these nearly
    rank-one factors turn with the last bits of LAPACK's QR, which differ between OpenBLAS's
    AVX2 and AVX-512 kernels)."""

    def update(k: int | None, frequency: int) -> jax.Array:
        options = {"precondition_frequency": frequency, "block_size": 32}
        tx = adam_jax.soap(3e-3, **options, basis_dtype=jnp.bfloat16, basis_rectification=k)
        return _run(tx, _params())[0]["w"]

    np.testing.assert_array_equal(update(None, 2), update(2, 2))
    updates = {k: update(k, 10) for k in (0, 1, 2)}
    size = float(jnp.abs(updates[2]).max())
    gap = {k: float(jnp.abs(updates[k] - updates[2]).max()) / size for k in (0, 1)}
    # bfloat16 bases are ~3e-3 from orthonormal, ~1e-5 after one iteration (scale_by_soap).
    assert 0 < gap[1] < 1e-4 < gap[0] < 1e-2
