"""SOAP's refresh orthonormalized by Cholesky QR (``orthogonalization="cholesky_qr"``), the
default on accelerators, against the authors' QR.

* The method alone: for full-rank power iterates, the Q of Householder QR up to its columns'
  signs; for rank-deficient, rank-one and nearly parallel ones (the first steps, small
  batches, embedding blocks), orthonormal to 1e-12 in float64 and 1e-5 in float32.
* SOAP with it: every case of the generic table (``tests/references/soap.py``), blocks,
  three-dimensional and merged leaves against the float64 reference to 1e-10; in float32, no
  further from the float64 reference than the authors' QR in float32 (this library's QR path,
  which the table checks against the authors' arithmetic).
* The programs: exported for CUDA and TPU, SOAP's step with the default (blocked or not)
  calls no QR kernel, and the refresh's products are at float32's accuracy: six
  bfloat16 passes on a GPU, ``Precision.HIGHEST`` on a TPU.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from references.common import make_problem, run_jax, run_reference
from references.soap import RefSoap
from test_soap import _relative_error, _rule, run_with_bases_pinned
from variants import BY_NAME

import adam_jax
from adam_jax._src.orthonormalization import cholesky_qr
from adam_jax._src.variants.soap import _refresh_blocks
from adam_jax._src.variants.soap.solves import descending_order

SOAP = BY_NAME["soap"]
CHOLESKY = {"orthogonalization": "cholesky_qr"}


def _power_iterate(rng: np.random.Generator, d: int, rank: int, settled: bool) -> tuple:
    """SOAP's power iterate ``L Q`` for a factor ``L`` of rank ``rank``, and the old basis
    ``Q``: near ``L``'s eigenvectors (a settled basis) or any orthonormal basis."""
    a = rng.standard_normal((d, rank))
    factor = a @ a.T
    if settled:
        eigenvectors = np.linalg.eigh(factor)[1]
        old = np.linalg.qr(eigenvectors + 0.1 * rng.standard_normal((d, d)))[0]
    else:
        old = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return factor @ old, old


def _signs_aligned(q: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return q * np.sign(np.sum(q * reference, axis=-2, keepdims=True))


def _orthonormality(q: np.ndarray) -> float:
    q = np.asarray(q, np.float64)
    return float(np.max(np.abs(np.swapaxes(q, -1, -2) @ q - np.eye(q.shape[-1]))))


@pytest.mark.parametrize("d", [4, 32, 128])
def test_full_rank_power_iterates_get_the_q_of_householder_qr(d: int, x64: None) -> None:
    """A batch of 3 power iterates of full-rank factors (condition numbers 10 to 1e3)."""
    rng = np.random.default_rng(d)
    pairs = [_power_iterate(rng, d, 2 * d, True) for _ in range(3)]
    x, old = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    q = np.asarray(jax.jit(cholesky_qr)(jnp.asarray(x), jnp.asarray(old)))
    expected = np.linalg.qr(x)[0]
    np.testing.assert_allclose(_signs_aligned(q, expected), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("rank", [0, 1, 3, 16])
@pytest.mark.parametrize("settled", [True, False])
def test_rank_deficient_power_iterates_give_orthonormal_bases(
    dtype: Any, rank: int, settled: bool, x64: None
) -> None:
    """A batch of 4 power iterates of factors of rank 0 (a block no gradient reached), 1, 3
    and 16 of 64, the old basis settled or arbitrary (a rank-one factor's iterate has all its
    columns parallel). Orthonormal to 1e-12 (float64) and 1e-5 (float32), no NaN; the
    columns the factor's range determines are QR's."""
    rng = np.random.default_rng(rank)
    d = 64
    pairs = [_power_iterate(rng, d, max(rank, 1), settled) for _ in range(4)]
    x = np.stack([p[0] for p in pairs]) * (rank > 0)
    old = np.stack([p[1] for p in pairs])
    q = np.asarray(jax.jit(cholesky_qr)(jnp.asarray(x, dtype), jnp.asarray(old, dtype)))
    assert np.all(np.isfinite(q))
    assert _orthonormality(q) < (1e-12 if dtype == jnp.float64 else 1e-5)
    if rank and settled and dtype == jnp.float64:
        expected = np.linalg.qr(x)[0][..., :rank]
        aligned = _signs_aligned(q[..., :rank], expected)
        np.testing.assert_allclose(aligned, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("settled", [True, False])
def test_a_large_rank_deficient_power_iterate_gets_an_orthonormal_basis(settled: bool) -> None:
    """A float32 power iterate of a ``768 x 768`` factor of rank 384 (as GPT-2's ``3072``-wide
    factors are in their first steps): orthonormal to 1e-5 after the passes, its range's
    columns QR's. With the shift bounded by the Gram matrix's trace it was 0.24 from
    orthonormal: the shift, near 1 there, left the small singular values where they were."""
    rng = np.random.default_rng(768)
    x, old = _power_iterate(rng, 768, 384, settled)
    q = np.asarray(jax.jit(cholesky_qr)(jnp.asarray(x, jnp.float32), jnp.asarray(old, jnp.float32)))
    assert _orthonormality(q) < 1e-5
    expected = np.linalg.qr(x)[0][:, :384]
    assert np.max(np.abs(_signs_aligned(q[:, :384], expected) - expected)) < 1e-2


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("d", [16, 64, 128])
def test_columns_near_orthogonal_pairwise_that_span_one_dimension_less(
    dtype: Any, d: int, x64: None
) -> None:
    """Power iterates whose columns are each nearly orthogonal to every other (inner products
    -1/(d - 1) once scaled to unit norm) but span d - 1 dimensions: their Gram matrix is
    singular though no entry of it is far from the identity's, as a 64 x 64 factor's was in the
    language-model race (the setting to use with Cholesky QR went NaN at step 831). Scaled
    columns, rotated, three to a batch: no NaN, orthonormal to 1e-12 (float64) and 1e-5
    (float32), and the columns of ``x`` in the span of Q's."""
    _check_near_orthogonal_columns(dtype, d)


@pytest.mark.parametrize(
    ("dtype", "d"), [(jnp.float64, 256), (jnp.float32, 256), (jnp.float64, 300)]
)
def test_columns_near_orthogonal_pairwise_with_the_blocked_calls(
    dtype: Any, d: int, monkeypatch: pytest.MonkeyPatch, x64: None
) -> None:
    """The same singular Gram matrices with a TPU's panel-by-panel factorization and solve
    (put in on the CPU), sizes a whole number of panels and not: a singular panel makes the
    unshifted factor ``NaN`` from there on, and the pass takes the shifted one. (At d = 300 in
    float32 the unit-scaled case is not orthonormal after the eight passes, with the native calls
    as with these: 2.8e-2.)"""
    from adam_jax._src import orthonormalization

    monkeypatch.setattr(orthonormalization, "_cholesky", orthonormalization.blocked_cholesky)
    monkeypatch.setattr(
        orthonormalization, "_right_division", orthonormalization.blocked_right_division
    )
    _check_near_orthogonal_columns(dtype, d)


def _check_near_orthogonal_columns(dtype: Any, d: int) -> None:
    rng = np.random.default_rng(d)
    centered = np.eye(d) - 1.0 / d  # every column orthogonal to the all-ones vector
    x = np.stack(
        [
            np.linalg.qr(rng.standard_normal((d, d)))[0] @ centered * scales
            for scales in (np.ones(d), rng.uniform(0.5, 2.0, d), np.logspace(0, -3, d))
        ]
    )
    old = np.stack([np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(3)])
    q = np.asarray(jax.jit(cholesky_qr)(jnp.asarray(x, dtype), jnp.asarray(old, dtype)))
    assert np.all(np.isfinite(q))
    assert _orthonormality(q) < (1e-12 if dtype == jnp.float64 else 1e-5)
    projected = q @ (np.swapaxes(q, -1, -2) @ x)
    scale = np.max(np.abs(x))
    np.testing.assert_allclose(
        projected, x, rtol=0, atol=(1e-12 if dtype == jnp.float64 else 1e-5) * scale
    )


@pytest.mark.parametrize("scale", [2.0**-70, 2.0**70])
def test_tiny_and_huge_power_iterates_get_the_same_bases(scale: float) -> None:
    """A block that no gradient reaches (the embedding's rows of bytes a corpus never holds)
    has factors of 1e-14 and less; their power iterate's squares underflow in float32 (the
    setting to use with Cholesky QR went NaN at step 681 of a language-model race there), and
    a huge one's overflow. Scaled by 2^-70 or 2^70, a batch of float32 power iterates (full
    rank, rank 3, rank one) gets the bases of the unscaled ones, bit for bit."""
    rng = np.random.default_rng(7)
    pairs = [_power_iterate(rng, 64, rank, True) for rank in (128, 3, 1)]
    x = jnp.asarray(np.stack([p[0] for p in pairs]), jnp.float32)
    old = jnp.asarray(np.stack([p[1] for p in pairs]), jnp.float32)
    orthonormalize = jax.jit(cholesky_qr)
    expected = np.asarray(orthonormalize(x, old))
    assert _orthonormality(expected) < 1e-5
    np.testing.assert_array_equal(np.asarray(orthonormalize(x * scale, old)), expected)


@pytest.mark.parametrize("case", list(SOAP.cases))
def test_every_case_against_the_float64_reference(case: str, x64: None) -> None:
    options = SOAP.cases[case]
    problem = make_problem(seed=11, steps=SOAP.steps)
    expected_traj, expected_updates = run_reference(SOAP.reference(**options), problem, SOAP.steps)
    traj, updates, _ = run_jax(
        SOAP.make(**options, **CHOLESKY), problem, SOAP.steps, dtype=np.float64
    )
    assert _relative_error(traj, expected_traj) < 1e-10
    assert _relative_error(updates, expected_updates) < 1e-10


@pytest.mark.parametrize(
    ("shapes", "options"),
    [
        ({"b": (5,), "s": (), "w": (2, 3, 4)}, {}),
        ({"b": (5,), "s": (), "w": (2, 2, 4)}, {"merge_dims": True, "max_precond_dim": 4}),
        ({"w": (12, 10), "t": (6, 5, 4), "s": ()}, {"block_size": 4, "precondition_frequency": 5}),
    ],
    ids=["3d", "3d_merged", "blocks"],
)
def test_tensors_and_blocks_against_the_float64_reference(
    shapes: dict, options: dict, x64: None
) -> None:
    """The reference's bases pinned to ours after the first step (a ragged block's first
    factor is rank-deficient, its eigenbasis arbitrary: see tests/test_soap.py)."""
    steps = 13
    problem = make_problem(seed=12, steps=steps, shapes=shapes)
    tx = adam_jax.soap(1e-2, weight_decay=0.05, **options, **CHOLESKY)
    ref = RefSoap(learning_rate=1e-2, weight_decay=0.05, **options)
    ours, theirs = run_with_bases_pinned(tx, ref, problem, steps, _rule(**options).layout)
    assert _relative_error(ours, theirs) < 1e-10


@pytest.mark.parametrize(
    "options",
    [{}, {"precondition_1d": True, "precondition_frequency": 2}, {"block_size": 3}],
    ids=["default", "rank_one_vector_factors", "ragged_blocks"],
)
def test_float32_within_the_authors_float32_error(options: dict, x64: None) -> None:
    """Float32 trajectories of 40 steps with Cholesky QR and with the authors' QR: they differ
    by less than the authors' float32 trajectory differs from its float64 one (the rank-one
    factors of ``precondition_1d`` refreshed every second step, their null spaces' bases
    arbitrary; ragged blocks rank-deficient at first). The bases with Cholesky QR stay
    orthonormal to 1e-5."""
    steps = 40
    problem = make_problem(seed=13, steps=steps)
    expected, _, _ = run_jax(adam_jax.soap(1e-2, **options), problem, steps, dtype=np.float64)
    runs = {}
    for method in ("qr", "cholesky_qr"):
        tx = adam_jax.soap(1e-2, orthogonalization=method, **options)
        traj, _, state = run_jax(tx, problem, steps, dtype=jnp.float32, exact_grads=True)
        runs[method] = {k: v.astype(np.float64) for k, v in traj.items()}
    authors_error = _relative_error(runs["qr"], expected)
    assert 0 < _relative_error(runs["cholesky_qr"], runs["qr"]) < authors_error
    layout = _rule(**options).layout
    for k, p in problem.params.items():
        for bases in layout.unpack_blocks(np.asarray(state[0].q[k]), p.shape):
            for q in bases:
                if q is not None:
                    assert _orthonormality(q) < 1e-5


def _six_bfloat16_passes(a: jax.Array, b: jax.Array) -> jax.Array:
    """A GPU's float32 product at ``BF16_BF16_F32_X6``, on the CPU: each operand split into
    three bfloat16 parts, six of the nine products of parts (the three smallest dropped), exact
    in float32 and summed in float32 smallest first, as XLA:GPU's Triton emitter sums them."""

    def parts(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        high = x.astype(jnp.bfloat16)
        rest = x - high.astype(jnp.float32)
        mid = rest.astype(jnp.bfloat16)
        return high, mid, (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)

    (a_high, a_mid, a_low), (b_high, b_mid, b_low) = parts(a), parts(b)
    total = jnp.zeros(jnp.broadcast_shapes(a.shape[:-1], b.shape[:-2] + (1,)) + b.shape[-1:])
    for x, y in [
        (a_mid, b_mid),
        (a_low, b_high),
        (a_high, b_low),
        (a_mid, b_high),
        (a_high, b_mid),
        (a_high, b_high),
    ]:
        total = total + jnp.matmul(x, y, preferred_element_type=jnp.float32)
    return total


def _with_six_bfloat16_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refresh's float32 power iterates and Gram matrices made as a GPU makes them (the
    moments' rotations, which no basis depends on, stay in float32), jax's caches cleared so
    that nothing traced before is reused."""
    from adam_jax._src import orthonormalization
    from adam_jax._src.variants.soap import solves

    native = orthonormalization.full_precision_matmul

    def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
        if a.dtype == b.dtype == jnp.float32:
            return _six_bfloat16_passes(a, b)
        return native(a, b)

    for module in (orthonormalization, solves):
        monkeypatch.setattr(module, "full_precision_matmul", matmul)
    jax.clear_caches()


def test_six_bfloat16_passes_emulated_are_float32s_products() -> None:
    """The emulation of the GPU's products is what the algorithm promises: within float32's
    rounding of float64's product (and a single bfloat16 pass is not)."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, 3, 256, 256)).astype(np.float32)
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    scale = np.abs(a) @ np.abs(b)  # the bound of a product's rounding, per entry
    six = np.asarray(_six_bfloat16_passes(jnp.asarray(a), jnp.asarray(b)), np.float64)
    one = np.asarray(jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)), np.float64)
    eps = np.finfo(np.float32).eps
    assert np.max(np.abs(six - exact) / scale) < 4 * eps
    assert np.max(np.abs(one - exact) / scale) > 100 * eps


@pytest.mark.parametrize(
    ("rank", "settled"), [(1, True), (16, True), (16, False)], ids=["rank1", "rank16", "unsettled"]
)
def test_a_gpus_six_bfloat16_passes_give_orthonormal_bases(
    rank: int, settled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank-deficient float32 power iterates (d = 64) with the products a GPU makes:
    orthonormal to 1e-5 as in float32, no NaN."""
    _with_six_bfloat16_passes(monkeypatch)
    rng = np.random.default_rng(rank)
    pairs = [_power_iterate(rng, 64, rank, settled) for _ in range(4)]
    x = jnp.asarray(np.stack([p[0] for p in pairs]), jnp.float32)
    old = jnp.asarray(np.stack([p[1] for p in pairs]), jnp.float32)
    q = np.asarray(jax.jit(cholesky_qr)(x, old))
    assert np.all(np.isfinite(q))
    assert _orthonormality(q) < 1e-5


@pytest.mark.parametrize("d", [64, 128])
def test_a_gpus_six_bfloat16_passes_with_columns_near_orthogonal_pairwise(
    d: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Columns near orthogonal pairwise that span one dimension less (a singular Gram matrix)
    with the products a GPU makes: orthonormal to 1e-5 as in float32, the columns in Q's
    span."""
    _with_six_bfloat16_passes(monkeypatch)
    _check_near_orthogonal_columns(jnp.float32, d)


def test_a_gpus_six_bfloat16_passes_keep_soap_within_the_authors_float32_error(
    monkeypatch: pytest.MonkeyPatch, x64: None
) -> None:
    """SOAP in float32 for 40 steps with Cholesky QR and the refresh's products a GPU makes:
    no further from the authors' QR in float32 than that is from float64 (as
    :func:`test_float32_within_the_authors_float32_error` holds in float32)."""
    steps = 40
    problem = make_problem(seed=13, steps=steps)
    expected, _, _ = run_jax(adam_jax.soap(1e-2), problem, steps, dtype=np.float64)
    authors, _, _ = run_jax(
        adam_jax.soap(1e-2, orthogonalization="qr"),
        problem,
        steps,
        dtype=jnp.float32,
        exact_grads=True,
    )
    _with_six_bfloat16_passes(monkeypatch)
    ours, _, state = run_jax(
        adam_jax.soap(1e-2, **CHOLESKY), problem, steps, dtype=jnp.float32, exact_grads=True
    )
    ours, authors = ({k: v.astype(np.float64) for k, v in t.items()} for t in (ours, authors))
    assert 0 < _relative_error(ours, authors) < _relative_error(authors, expected)
    for k, p in problem.params.items():
        for bases in _rule().layout.unpack_blocks(np.asarray(state[0].q[k]), p.shape):
            for q in bases:
                if q is not None:
                    assert _orthonormality(q) < 1e-5


def _kernels(text: str) -> set[str]:
    return set(re.findall(r"custom_call @(\w+)", text)) | set(
        re.findall(r'call_target_name = "(\w+)"', text)
    )


@pytest.mark.parametrize("block_size", [None, 8])
def test_the_default_step_calls_no_qr_kernel_on_accelerators(block_size: int | None) -> None:
    """Exported for CUDA and TPU: no ``geqrf``/``orgqr`` (Householder QR), Cholesky instead;
    exported for the CPU, Householder QR."""
    params = {"a": jnp.ones((16, 24)), "b": jnp.ones((24, 8, 4)), "c": jnp.ones(4)}
    tx = adam_jax.scale_by_soap(block_size=block_size, precondition_frequency=2)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for platform in ("cuda", "tpu"):
        text = jax.export.export(step, platforms=[platform])(params, state, params).mlir_module()
        kernels = _kernels(text)
        assert not any("geqrf" in k or "orgqr" in k or "Qr" in k for k in kernels), kernels
        if platform == "cuda":
            assert any("potrf" in k for k in kernels), kernels
    text = jax.export.export(step, platforms=["cpu"])(params, state, params).mlir_module()
    assert any("geqrf" in k for k in _kernels(text))


_SIX_BFLOAT16_PASSES = (
    "algorithm = <lhs_precision_type = bf16, rhs_precision_type = bf16, accumulation_type = f32,"
    " lhs_component_count = 1, rhs_component_count = 1, num_primitive_operations = 6"
)


@pytest.mark.parametrize(
    ("platform", "dtype", "expected"),
    [
        ("cuda", np.float32, _SIX_BFLOAT16_PASSES),
        ("tpu", np.float32, "precision = [HIGHEST, HIGHEST]"),
        ("cuda", np.float64, "precision = [HIGHEST, HIGHEST]"),
    ],
    ids=["cuda", "tpu", "cuda_float64"],
)
def test_the_refresh_products_run_at_float32_accuracy(
    platform: str, dtype: Any, expected: str, x64: None
) -> None:
    """Every product of a refresh (the power iterate, Cholesky QR's Gram matrices, the moments'
    rotations) in the exported program: in float32 on a GPU as six bfloat16 passes (the tensor
    cores), on a TPU at ``HIGHEST`` (the same passes); in float64 at ``HIGHEST``."""
    n, d = 3, 8
    rng = np.random.default_rng(0)
    factors = [jnp.asarray(rng.standard_normal((n, d, d)), dtype), None]
    bases = [jnp.asarray(np.linalg.qr(rng.standard_normal((n, d, d)))[0], dtype), None]
    mu = jnp.asarray(rng.standard_normal((n, d, 5)), dtype)
    nu = jnp.asarray(rng.random((n, d, 5)), dtype)

    def refresh(factors: Any, bases: Any, mu: jax.Array, nu: jax.Array) -> Any:
        return _refresh_blocks(factors, bases, mu, nu, None, "auto")

    text = jax.export.export(jax.jit(refresh), platforms=[platform])(
        factors, bases, mu, nu
    ).mlir_module()
    dots = re.findall(r"stablehlo\.dot_general[^\n]*", text)
    assert len(dots) >= 5
    for dot in dots:
        assert expected in dot, dot


def test_an_unknown_orthogonalization_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"orthogonalization must be one of .*'cholesky_qr'"):
        adam_jax.soap(1e-2, orthogonalization="svd")


def _layers(count: int) -> dict[str, Any]:
    """``count`` layers of a two-matrix block (16 x 24, 24 x 16, a bias)."""
    return {
        f"layer_{i}": {"w1": jnp.ones((16, 24)), "w2": jnp.ones((24, 16)), "b": jnp.ones(16)}
        for i in range(count)
    }


@pytest.mark.parametrize(("block_size", "sizes"), [(None, 2), (8, 1)])
def test_solver_calls_and_loops_do_not_grow_with_the_leaves(
    block_size: int | None, sizes: int
) -> None:
    """Exported for CUDA, SOAP's step with 1 layer and with 4 (3 and 9 leaves) makes as many
    ``eigh`` (first step) and Cholesky factorizations (refresh) and has as many loops: one
    stacked call for each size of factor (16 and 24 without blocks, 8 with blocks of 8), the
    refresh's in one loop of a fixed number of passes, then the rest of the passes in one
    branch; no other loop."""
    counts = []
    for layers in (1, 4):
        params = _layers(layers)
        tx = adam_jax.scale_by_soap(block_size=block_size, precondition_frequency=2)
        state = tx.init(params)
        exported = jax.export.export(jax.jit(tx.update), platforms=["cuda"])
        text = exported(params, state, params).mlir_module()
        counts.append(
            (
                len(re.findall(r"@cusolver_syevd\w*\(", text)),
                len(re.findall(r"@cusolver_potrf\w*\(", text)),
                len(re.findall(r"stablehlo\.while", text)),
            )
        )
    assert counts[0] == counts[1], counts
    eighs, factorizations, loops = counts[0]
    assert eighs == sizes and factorizations > 0 and loops == 2 * sizes, counts


def test_a_matrix_gets_the_same_q_alone_and_batched_with_harder_ones() -> None:
    """Each matrix stops at its own pass: a settled power iterate's Q is the same, bit for bit,
    alone and stacked with a singular one that takes five more passes (SOAP stacks the blocks
    of every leaf, which must not change a leaf's basis)."""
    rng = np.random.default_rng(3)
    d = 64
    settled = _power_iterate(rng, d, 2 * d, True)
    centered = np.linalg.qr(rng.standard_normal((d, d)))[0] @ (np.eye(d) - 1.0 / d)
    hard = (centered, np.linalg.qr(rng.standard_normal((d, d)))[0])
    orthonormalize = jax.jit(cholesky_qr)
    alone = orthonormalize(*(jnp.asarray(x[None], jnp.float32) for x in settled))
    both = orthonormalize(
        *(jnp.asarray(np.stack([a, b]), jnp.float32) for a, b in zip(settled, hard, strict=True))
    )
    np.testing.assert_array_equal(np.asarray(both[0]), np.asarray(alone[0]))
    assert _orthonormality(both[1]) < 1e-5


@pytest.mark.parametrize("d", [257, 512, 700])
def test_blocked_factorization_and_division_match_the_native_ones(d: int, x64: None) -> None:
    """A TPU's panel-by-panel Cholesky factorization and ``X L^{-T}`` (run here on the CPU, in
    float64, a batch of two): NumPy's factor and solve, to rounding, for sizes a whole number of
    panels and not; a matrix that is not positive definite gets ``NaN``, as from
    ``jnp.linalg.cholesky``."""
    from adam_jax._src.orthonormalization import blocked_cholesky, blocked_right_division

    rng = np.random.default_rng(d)
    a = rng.standard_normal((2, d, d))
    spd = a @ np.swapaxes(a, -1, -2) + d * np.eye(d)
    reference = np.linalg.cholesky(spd)
    lower = np.asarray(blocked_cholesky(jnp.asarray(spd)))
    assert np.max(np.abs(lower - reference)) < 1e-12 * np.max(np.abs(reference))
    x = rng.standard_normal((2, d, d))
    expected = np.swapaxes(np.linalg.solve(reference, np.swapaxes(x, -1, -2)), -1, -2)
    divided = np.asarray(blocked_right_division(jnp.asarray(reference), jnp.asarray(x)))
    assert np.max(np.abs(divided - expected)) < 1e-12 * np.max(np.abs(expected))
    indefinite = np.eye(d)
    indefinite[-1, -1] = -1.0
    assert np.isnan(np.asarray(blocked_cholesky(jnp.asarray(indefinite)))).any()


def test_cholesky_qr_with_the_blocked_calls_gives_householder_q(
    monkeypatch: pytest.MonkeyPatch, x64: None
) -> None:
    """Cholesky QR as a TPU computes it for a ``300 x 300`` power iterate (the blocked calls
    put in on the CPU): the Q of Householder QR, as with the native calls."""
    from adam_jax._src import orthonormalization

    monkeypatch.setattr(orthonormalization, "_cholesky", orthonormalization.blocked_cholesky)
    monkeypatch.setattr(
        orthonormalization, "_right_division", orthonormalization.blocked_right_division
    )
    rng = np.random.default_rng(5)
    x, old = _power_iterate(rng, 300, 300, True)
    q = np.asarray(cholesky_qr(jnp.asarray(x), jnp.asarray(old)))
    reference = np.linalg.qr(x)[0]
    assert np.max(np.abs(_signs_aligned(q, reference) - reference)) < 1e-10
    assert _orthonormality(q) < 1e-13


def test_a_tpu_factorizes_a_panel_at_a_time() -> None:
    """Exported for a TPU, the refreshes of a ``300 x 8`` leaf's ``300 x 300`` factor (and the
    power start's first bases) factorize no matrix larger than a panel: libtpu compiles a large
    Cholesky factorization as many calls, slowly. (``eigh``'s first bases would bring jax's own
    QDWH eigensolver, which factorizes the whole matrix.) Nor do they sort: the columns' order
    is counted (libtpu compiles a sort slowly too). Exported for CUDA, the refresh calls
    cuSOLVER on the whole matrix, as before."""
    from adam_jax._src.orthonormalization import TPU_PANEL

    params = {"w": jnp.ones((300, 8))}
    tx = adam_jax.scale_by_soap(precondition_frequency=2, first_basis="power")
    step = jax.jit(tx.update)
    state = tx.init(params)
    tpu = jax.export.export(step, platforms=["tpu"])(params, state, params).mlir_module()
    square = r"stablehlo\.cholesky[^\n]*tensor<(?:\d+x)*?(\d+)x\1xf32>"
    sizes = [int(n) for n in re.findall(square, tpu)]
    assert sizes and max(sizes) == TPU_PANEL, sizes
    assert "stablehlo.sort" not in tpu
    cuda = jax.export.export(step, platforms=["cuda"])(params, state, params).mlir_module()
    assert re.search(r"cusolver_potrf\w*\([^\n]*tensor<(?:\d+x)*300x300xf32>", cuda)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, np.inf, -np.inf, np.nan]),
        min_size=1,
        max_size=24,
    ),
    random=st.integers(0, 2**31 - 1),
)
def test_the_refresh_orders_columns_as_a_stable_descending_argsort(
    values: list[float], random: int
) -> None:
    """The refresh's order of the basis's columns (``descending_order``, counted rather than
    sorted) is the authors' ``argsort(descending=True)`` as jnp's stable one gives it: ties
    (``0`` and ``-0`` too) in their order, NaN first; here against Python's ``sorted``, on rows
    with ties and non-finite values and on rows of distinct random values."""
    rng = np.random.default_rng(random)
    tied = np.asarray(values, np.float32)
    rows = [tied, rng.standard_normal(len(values)).astype(np.float32)]
    got = np.asarray(descending_order(jnp.asarray(np.stack(rows))))
    for row, order in zip(rows, got, strict=True):
        expected = sorted(
            range(len(row)),
            key=lambda i: (0, 0.0, i) if np.isnan(row[i]) else (1, -float(row[i]), i),
        )
        assert order.tolist() == expected, (row, order)
