r"""The orthonormalization of SOAP's refresh: the Q of a QR decomposition of the power iterate.

Two methods compute the same Q (up to the signs of its columns, which SOAP's update does not
see):

* ``"qr"``: Householder QR (``jnp.linalg.qr``), the authors' ``torch.linalg.qr``. On a GPU,
  jaxlib calls cuSOLVER's ``geqrf`` and forms Q with ``orgqr`` one matrix at a time in a loop
  over a batch of blocks (JAX issue 8542).
* ``"cholesky_qr"``: Cholesky QR, made of batched products, a batched Cholesky factorization
  and a batched triangular solve, repeated until the columns are orthonormal, each matrix
  on its own (its Q kept from the pass that made it orthonormal), in loops whose trip counts
  the program knows: :data:`SURE_PASSES` passes, then, in one branch taken where a matrix of
  the batch needs them, the rest of :data:`PASSES` (a GPU reads one branch index a batch,
  where a loop testing each pass had it wait on the host at every pass):

  .. math::

     X \leftarrow X R^{-1}, \qquad R^\top R = X^\top X + s I,

  each pass a right-multiplication by an upper triangular matrix with a positive diagonal, so
  the columns span the same nested subspaces as the power iterate's and the result is its QR's
  Q. The columns are first scaled to unit norm (which changes no Q but makes the power
  iterate, whose columns are nearly orthogonal once the bases have settled, well conditioned),
  and the previous basis is added at the scale of the power iterate's rounding, so that a
  column that depends on the others (a rank-deficient factor's: the first steps, small
  batches, embedding blocks) takes the previous basis's direction, orthogonalized against the
  others: an orthonormal completion of the factor's range, as any is. While a Gram matrix is
  far from the identity the pass is shifted by :math:`s` of the order of its rounding (shifted
  Cholesky QR, Fukaya et al. 2020), so that its factorization cannot fail; the last passes are
  not shifted. The shift bounds the largest eigenvalue by the Gram matrix's Frobenius norm: by
  its trace (:math:`d` for unit columns), it was :math:`\sqrt{d}` times too large for columns
  near orthogonal, and at :math:`d \ge 512` a pass then barely grew the small singular values
  (a float32 power iterate of rank 384 of 768 was 0.24 from orthonormal after the passes).
  A Gram matrix whose entries are all near the identity's can still be singular (64 unit
  columns, none more than 0.44 from orthogonal to another, that span 63 dimensions: a factor
  of SOAP's in a language model, whose unshifted factorization failed): a pass also takes the
  shifted factorization where the unshifted one is not finite or has a pivot below 1/2, the
  mark of a nearly dependent column (both are computed, and one selected).

  On a TPU the factorization and the triangular solve of a matrix larger than
  :data:`TPU_PANEL` go a panel of columns at a time, in a loop (:func:`blocked_cholesky`,
  :func:`blocked_right_division`): libtpu compiles a large one as many calls, slowly. The loop
  does about twice the arithmetic of a pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

_Result = TypeVar("_Result")

#: The accepted values of SOAP's ``orthogonalization``.
ORTHOGONALIZATIONS = ("auto", "qr", "cholesky_qr")

#: Passes of Cholesky QR at most, a number fixed when the program is compiled: a settled basis
#: is orthonormal after two, a rank-deficient factor's power iterate after four or five, and
#: the hardest case of tests/test_soap_orthogonalization.py (float32 columns near orthogonal
#: pairwise that span one dimension less) after seven at d = 128 and ten at d = 3072.
PASSES = 10
#: The passes every batch takes (a settled basis's); the others run in a branch taken when a
#: matrix needs them.
SURE_PASSES = 2
# A Gram matrix with an entry further than this from the identity's is factorized with a
# shift, and so is one whose unshifted Cholesky factor has a pivot below it.
_SHIFTED_ABOVE = 0.5
#: The columns a TPU factorizes and solves at a time (:func:`blocked_cholesky`).
TPU_PANEL = 128
#: The algorithm of the refresh's float32 products on a GPU: each operand split into three
#: bfloat16 parts, six of their nine products accumulated in float32 (Henry et al. 2019), as
#: accurate as float32's own, on the tensor cores (989 bfloat16 TFLOPS a sixth of the time on
#: an H100: 165, against 67 on its CUDA cores for float32 at ``HIGHEST``). A TPU's ``HIGHEST``
#: is these passes.
SIX_BFLOAT16_PASSES = "BF16_BF16_F32_X6"


def at_full_precision(fn: Callable[..., _Result], *args: Any) -> _Result:
    """``fn(*args)``, its products at float32's accuracy: at :data:`SIX_BFLOAT16_PASSES` on a
    GPU where no array is wider than float32, at ``HIGHEST`` elsewhere (a TPU's are the same
    passes; XLA:CPU multiplies in float32, and does not take the passes for every product;
    they would round float64 to float32)."""

    def under(precision: str) -> Callable[..., _Result]:
        def run(*xs: Any) -> _Result:
            with jax.default_matmul_precision(precision):
                return fn(*xs)

        return run

    if any(x.dtype.itemsize > 4 for x in jax.tree.leaves(args)):
        return under("highest")(*args)
    return jax.lax.platform_dependent(
        *args, cuda=under(SIX_BFLOAT16_PASSES), default=under("highest")
    )


def full_precision_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at float32's accuracy (:func:`at_full_precision`): the refresh's products."""
    return at_full_precision(jnp.matmul, a, b)


def _householder(x: jax.Array) -> jax.Array:
    return jnp.linalg.qr(x)[0]


def _triangular_right_division(lower: jax.Array, x: jax.Array) -> jax.Array:
    return jax.lax.linalg.triangular_solve(lower, x, left_side=False, lower=True, transpose_a=True)


def _blocks_of(d: int) -> tuple[int, int]:
    """The panels of a blocked factorization of a ``(d, d)`` matrix: their count, and the
    padding that makes ``d`` a whole number of :data:`TPU_PANEL` columns."""
    count = -(-d // TPU_PANEL)
    return count, count * TPU_PANEL - d


def _padded(x: jax.Array, pad: int, diagonal: float) -> jax.Array:
    """``x`` ``(..., d, d)`` grown by ``pad`` rows and columns, ``diagonal`` on the new part of
    the diagonal and zeros elsewhere."""
    if not pad:
        return x
    grown = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, pad)])
    new = jnp.arange(x.shape[-1] + pad) >= x.shape[-1]
    return grown + diagonal * jnp.diag(new.astype(x.dtype))


def blocked_cholesky(a: jax.Array) -> jax.Array:
    """The lower Cholesky factor of each ``(d, d)`` matrix of ``a``, a panel of
    :data:`TPU_PANEL` columns at a time in a loop (right-looking: each panel's diagonal block
    factorized, the panel divided by it, the rest of the matrix updated by its outer product).

    The same factor as ``jnp.linalg.cholesky``, its rounding apart; ``NaN`` where a pivot is
    not positive, as there. For a TPU, which compiles a large Cholesky factorization as many
    calls and slowly (libtpu 0.0.42.1, twelve ``3072 x 3072`` matrices: 33 s, this loop 2 s): the
    loop body is compiled once, whatever ``d``.
    """
    d = a.shape[-1]
    count, pad = _blocks_of(d)
    a = _padded(a, pad, 1.0)
    rows = jnp.arange(d + pad)[:, None]

    def panel(k: jax.Array, carry: tuple[jax.Array, jax.Array]) -> Any:
        rest, lower = carry
        start = k * TPU_PANEL
        columns = jax.lax.dynamic_slice_in_dim(rest, start, TPU_PANEL, axis=-1)
        diagonal = jax.lax.dynamic_slice_in_dim(columns, start, TPU_PANEL, axis=-2)
        factor = jnp.linalg.cholesky(diagonal)
        below = _triangular_right_division(factor, columns)
        below = jnp.where(rows >= start, below, 0.0)
        outer = full_precision_matmul(below, jnp.swapaxes(below, -1, -2))
        return rest - outer, jax.lax.dynamic_update_slice_in_dim(lower, below, start, axis=-1)

    _, lower = jax.lax.fori_loop(0, count, panel, (a, jnp.zeros_like(a)))
    # A diagonal block divided by its own factor gives the factor, and rounding above it.
    return jnp.tril(lower[..., :d, :d])


def blocked_right_division(lower: jax.Array, x: jax.Array) -> jax.Array:
    """``x L^{-T}`` for each lower triangular ``L`` of ``lower`` and matrix of ``x`` (both
    ``(..., d, d)``), a panel of :data:`TPU_PANEL` columns at a time in a loop (forward
    substitution by panels: ``Q_k = (X_k - Q_{<k} L_{k,<k}^T) L_{kk}^{-T}``), for the reason
    :func:`blocked_cholesky` gives."""
    d = x.shape[-1]
    count, pad = _blocks_of(d)
    lower = _padded(lower, pad, 1.0)
    x = _padded(x, pad, 0.0)
    columns = jnp.arange(d + pad)

    def panel(k: jax.Array, q: jax.Array) -> jax.Array:
        start = k * TPU_PANEL
        rows_of_l = jax.lax.dynamic_slice_in_dim(lower, start, TPU_PANEL, axis=-2)
        before = jnp.where(columns < start, rows_of_l, 0.0)
        known = full_precision_matmul(q, jnp.swapaxes(before, -1, -2))
        rest = jax.lax.dynamic_slice_in_dim(x, start, TPU_PANEL, axis=-1) - known
        diagonal = jax.lax.dynamic_slice_in_dim(rows_of_l, start, TPU_PANEL, axis=-1)
        solved = _triangular_right_division(diagonal, rest)
        return jax.lax.dynamic_update_slice_in_dim(q, solved, start, axis=-1)

    q = jax.lax.fori_loop(0, count, panel, jnp.zeros_like(x))
    return q[..., :d, :d]


def _by_panels_on_a_tpu(native: Any, blocked: Any, *xs: jax.Array) -> jax.Array:
    """``native(*xs)``; on a TPU ``blocked(*xs)`` where the matrices are larger than a panel."""
    if xs[-1].shape[-1] <= TPU_PANEL:
        return native(*xs)
    return jax.lax.platform_dependent(*xs, tpu=blocked, default=native)


def _cholesky(gram: jax.Array) -> jax.Array:
    return _by_panels_on_a_tpu(jnp.linalg.cholesky, blocked_cholesky, gram)


def _right_division(lower: jax.Array, x: jax.Array) -> jax.Array:
    """``x L^{-T}``: the right division by ``R = L^T``."""
    return _by_panels_on_a_tpu(_triangular_right_division, blocked_right_division, lower, x)


def _gram(q: jax.Array) -> jax.Array:
    return full_precision_matmul(jnp.swapaxes(q, -1, -2), q)


def _distance_from_identity(gram: jax.Array) -> jax.Array:
    """The largest entry of :math:`|X^\\top X - I|`, per matrix."""
    eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
    return jnp.max(jnp.abs(gram - eye), axis=(-2, -1))


def cholesky_qr(x: jax.Array, fallback: jax.Array) -> jax.Array:
    """The Q of the QR decomposition of each ``(d, d)`` matrix of ``x`` by repeated Cholesky
    QR (see the module), its R's diagonal positive.

    Args:
      x: a matrix ``(d, d)``, or a batch of them ``(..., d, d)``, float32 or float64.
      fallback: orthonormal matrices of ``x``'s shape that complete the columns of ``x`` where
        they depend on each other (SOAP's previous basis, its columns in ``x``'s order).

    Returns:
      The orthonormal matrices, ``x``'s shape and dtype.
    """
    d = x.shape[-1]
    eps = jnp.finfo(x.dtype).eps
    # Scaled by a power of two (exactly) to a largest entry between 1/2 and 1, so that the
    # squares below neither underflow (a block that no gradient reaches has factors of 1e-14
    # and less, whose power iterate's squares are flushed to zero) nor overflow.
    _, exponent = jnp.frexp(jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True))
    x = jnp.ldexp(x, -exponent)
    largest = jnp.max(jnp.sqrt(jnp.sum(jnp.square(x), axis=-2)), axis=-1)[..., None, None]
    # The previous basis at the scale of the product's rounding: a full-rank matrix whose QR
    # differs from the power iterate's by no more than its rounding does, where a column
    # that depends on the others (a rank-deficient factor's) gets the previous basis's
    # direction, orthogonalized against them. A zero power iterate keeps the previous basis.
    x = x + jnp.where(largest > 0, d**0.5 * eps * largest, 1) * fallback
    q = x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-2, keepdims=True))
    eye = jnp.eye(d, dtype=x.dtype)
    # Done when no entry of Q^T Q - I is above a few times the rounding of one more pass
    # (3e-7 to 7e-7 in float32 for d = 32 to 256).
    tolerance = 4 * d**0.5 * eps

    def orthonormalize(_: Any, carry: tuple[jax.Array, jax.Array, jax.Array]) -> Any:
        q, gram, distance = carry
        far = distance[..., None, None]
        # Of the order of the Gram matrix's rounding, relative to its largest eigenvalue
        # (at most its Frobenius norm).
        largest = jnp.sqrt(jnp.sum(jnp.square(gram), axis=(-2, -1), keepdims=True))
        shift = (d + 1) * eps * largest
        plain = _cholesky(gram)
        shifted = _cholesky(gram + shift * eye)
        # A singular Gram matrix can have every entry near the identity's: its unshifted
        # factor is then not finite, or has a small pivot. Both factorizations, then a
        # selection: a branch would cost a GPU a synchronization with the host in every pass.
        pivots = jnp.diagonal(plain, axis1=-2, axis2=-1)
        dependent = ~jnp.all(jnp.isfinite(plain), axis=(-2, -1)) | jnp.any(
            pivots < _SHIFTED_ABOVE, axis=-1
        )
        use_shift = (far > _SHIFTED_ABOVE) | dependent[..., None, None]
        lower = jnp.where(use_shift, shifted, plain)
        new_q = _right_division(lower, q)
        new_gram = _gram(new_q)
        # Each matrix on its own: one already orthonormal keeps its Q, so a matrix's Q does
        # not depend on the others of its batch (SOAP stacks the blocks of every leaf).
        done = (distance <= tolerance)[..., None, None]
        return (
            jnp.where(done, q, new_q),
            jnp.where(done, gram, new_gram),
            jnp.where(done[..., 0, 0], distance, _distance_from_identity(new_gram)),
        )

    # Each Gram matrix's distance from the identity is computed once, where the Gram matrix is,
    # for the test of the next pass and its choice of shift.
    gram = _gram(q)
    start = (q, gram, _distance_from_identity(gram))
    settled = jax.lax.fori_loop(0, SURE_PASSES, orthonormalize, start)

    def more(carry: tuple[jax.Array, jax.Array, jax.Array]) -> Any:
        return jax.lax.fori_loop(SURE_PASSES, PASSES, orthonormalize, carry)

    # The passes a settled basis needs, then the rest only where some matrix needs them: one
    # branch a batch, whose index a GPU reads (a loop testing each pass read it at each).
    q, _, _ = jax.lax.cond(jnp.any(settled[2] > tolerance), more, lambda c: c, settled)
    return q


def _one_at_a_time(fn: Any, *xs: jax.Array) -> jax.Array:
    """``fn`` of each matrix of a batch ``(n, d, d)`` in turn (of a matrix, itself)."""
    if xs[0].ndim == 2:
        return fn(*xs)
    return jax.lax.map(lambda args: fn(*args), xs)


def each_matrix(fn: Any, *xs: jax.Array) -> jax.Array:
    """``fn`` of a matrix, or of each matrix of a batch ``(n, d, d)``: on CPU one after
    another, elsewhere as a batch. jaxlib 0.10's batched CPU kernels (``eigh``, QR, Cholesky)
    share a large batch out over XLA:CPU's thread pool and wait for it on a thread of that
    pool, so as many of them at once as the pool has threads (a tree's groups of blocks, on 2
    cores) wait for each other forever; one matrix at a time never shares out."""
    if xs[0].ndim == 2:
        return fn(*xs)
    return jax.lax.platform_dependent(*xs, cpu=lambda *xs: _one_at_a_time(fn, *xs), default=fn)


def orthonormal(x: jax.Array, fallback: jax.Array, method: str) -> jax.Array:
    """The Q of the QR decomposition of a matrix ``(d, d)``, or of each of a batch, by
    ``method``: ``"qr"``, ``"cholesky_qr"``, or ``"auto"``: Householder QR on the CPU (the
    authors' arithmetic; neither method is faster
    there on both settings measured) and Cholesky QR on the accelerators (cuSOLVER's QR loops
    over a batch of blocks on a GPU: 34x slower there); docs/speed.md has the figures.
    ``fallback``: see :func:`cholesky_qr`."""
    if method == "qr":
        return each_matrix(_householder, x)
    if method == "cholesky_qr":
        return each_matrix(cholesky_qr, x, fallback)
    if method != "auto":
        raise ValueError(f"orthogonalization must be one of {ORTHOGONALIZATIONS}, got {method!r}")
    return jax.lax.platform_dependent(
        x,
        fallback,
        cpu=lambda x, fallback: _one_at_a_time(_householder, x),
        default=cholesky_qr,
    )
