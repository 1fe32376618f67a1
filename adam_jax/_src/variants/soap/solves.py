"""The eigendecompositions of SOAP's first step and the refreshes' sorts, power iterates and
orthonormalizations: computed where a leaf calls them (:data:`DIRECT`), or for the whole tree
at once, one batched call per kind, size and dtype (:func:`stacked`, which
:func:`~adam_jax.scale_by_soap` takes off the CPU).

Stacked, the solver calls do not grow with the number of leaves: GPT-2 small's 148 leaves, each
with its own ``eigh`` or Cholesky QR, become one call for each size of factor (the blocks of
every leaf that share a shape, as DASH stacks Shampoo's blocks). The tree's step is traced
twice: the first trace records each call's operands (and gets zeros back), which are then
stacked and solved; the second takes the answers in the same order. The operands of a call
depend on the step's inputs alone (the gradient, the factors and the bases, never on another
call's answer), so the first trace's records are the second's operands: XLA keeps one copy of
their arithmetic and drops the first trace's unused rest. Both traces step every leaf at once
(:data:`ALL_AT_ONCE`): the default schedule's order, in which a leaf's decoded moments wait for
the previous leaf's, would make each trace's operands other arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from adam_jax._src.orthonormalization import each_matrix, full_precision_matmul
from adam_jax.rules import LeafSchedule, LeafStep, orthonormal

_Result = TypeVar("_Result")

#: The most bytes of matrices one stacked call takes at once: larger stacks are solved in turn,
#: a chunk at a time, so that their temporaries (Cholesky QR holds about eight arrays of a
#: chunk's size) stay near those of the leaf-by-leaf calls they replace.
CHUNK_BYTES = 64 << 20


def _eigenvectors(m: jax.Array) -> jax.Array:
    return jnp.linalg.eigh(m, UPLO="L", symmetrize_input=False)[1]


def descending_order(values: jax.Array) -> jax.Array:
    """The indices that sort each row of ``values`` ``(..., d)`` decreasing, as
    ``jnp.argsort(values, axis=-1, descending=True)`` gives them (stable: equal values keep their
    order; NaN first), counted rather than sorted: a value's rank is the number of values that
    go before it, and the order is the ranks' inverse.

    libtpu compiles a sort slowly (a v5p: 4 to 6 s for each size of SOAP's factors at GPT-2
    small; these two reductions: under 1 s), and the ``d * d`` comparisons are few beside the
    refresh's ``d ** 3`` products."""
    d = values.shape[-1]
    index = jnp.arange(d)
    mine, other = values[..., :, None], values[..., None, :]
    mine_nan, other_nan = jnp.isnan(mine), jnp.isnan(other)
    tied = (other == mine) | (mine_nan & other_nan)
    before = (other > mine) | (other_nan & ~mine_nan) | (tied & (index < index[:, None]))
    rank = jnp.sum(before, axis=-1, dtype=jnp.int32)
    return jnp.sum(
        jnp.where(rank[..., :, None] == index, index[:, None], 0), axis=-2, dtype=jnp.int32
    )


def _refreshed(factor: jax.Array, basis: jax.Array, method: str) -> tuple[jax.Array, jax.Array]:
    """:meth:`Solves.refreshed_basis`, of a matrix or a batch of them."""
    # At float32's accuracy on accelerators too (TF32 products corrupt the estimated
    # eigenvalues, NVIDIA Emerging-Optimizers), as the authors' torch computes them.
    power = full_precision_matmul(factor, basis)
    estimated = jnp.sum(basis * power, axis=-2)
    order = descending_order(estimated)
    sort = order[..., None, :]
    sorted_power = jnp.take_along_axis(power, sort, axis=-1)
    sorted_basis = jnp.take_along_axis(basis, sort, axis=-1)
    return order, orthonormal(sorted_power, sorted_basis, method)


def _in_chunks(
    solve: Callable[..., tuple[jax.Array, ...]], batches: list[jax.Array]
) -> tuple[jax.Array, ...]:
    """``solve`` of batches ``(n, d, d)``, in turn on chunks of at most :data:`CHUNK_BYTES` of
    each (``jax.lax.map``, a loop whose trip count the program knows), so that the stacked
    calls' temporaries stay those of a chunk; the last chunk is filled with identities."""
    n, d = batches[0].shape[0], batches[0].shape[-1]
    per_chunk = max(1, CHUNK_BYTES // (d * d * batches[0].dtype.itemsize))
    if n <= per_chunk:
        return solve(*batches)
    chunks = -(-n // per_chunk)
    filler = jnp.broadcast_to(jnp.eye(d, dtype=batches[0].dtype), (chunks * per_chunk - n, d, d))
    chunked = [
        jnp.concatenate([b, filler.astype(b.dtype)]).reshape(chunks, per_chunk, d, d)
        for b in batches
    ]
    solved = jax.lax.map(lambda xs: solve(*xs), chunked)
    return tuple(x.reshape(chunks * per_chunk, *x.shape[2:])[:n] for x in solved)


class Solves:
    """SOAP's solver calls, each computed where the step makes it."""

    def eigenvectors(self, matrices: jax.Array) -> jax.Array:
        """The eigenvectors (by increasing eigenvalue, reading the lower triangle as torch
        does) of a symmetric matrix ``(d, d)`` or of each of a batch ``(n, d, d)``."""
        return each_matrix(_eigenvectors, matrices)

    def refreshed_basis(
        self, factor: jax.Array, basis: jax.Array, method: str
    ) -> tuple[jax.Array, jax.Array]:
        """The authors' ``get_orthogonal_matrix_QR`` of a factor :math:`F` and its basis
        :math:`Q` (a matrix ``(d, d)`` or a batch ``(n, d, d)`` of each): the order of
        :math:`Q`'s columns by the estimated eigenvalues :math:`\\mathrm{diag}(Q^\\top F Q)`,
        decreasing (``(d,)`` or ``(n, d)``), and the Q of the QR decomposition of the power
        iterate :math:`F Q` in that order, by ``method`` (:func:`adam_jax.rules.orthonormal`,
        the sorted :math:`Q` completing a column that depends on the others)."""
        return _refreshed(factor, basis, method)


#: The solver calls of a leaf-by-leaf step.
DIRECT = Solves()


class _AllAtOnce(LeafSchedule):
    """Each leaf stepped whole, none waiting for another's decoded moments to be stored (the
    default schedule's order): a stacked call takes every leaf's operands at once, and each
    trace of :func:`stacked` computes them alike, so that XLA keeps one copy."""

    def step(self, leaf: LeafStep, carry: Any) -> tuple[jax.Array, list[Any], Any]:
        update, new = leaf.run(leaf.stored, grad=leaf.grad, param=leaf.param)
        return update, new, carry

    def around(self, schedule: LeafSchedule) -> LeafSchedule:
        return self


#: The leaf schedule of a stacked step.
ALL_AT_ONCE = _AllAtOnce()


@dataclasses.dataclass
class _Recording(Solves):
    """Records each call's operands and answers zeros of the answer's shape."""

    calls: list[tuple[tuple[Any, ...], tuple[jax.Array, ...]]] = dataclasses.field(
        default_factory=list
    )

    def eigenvectors(self, matrices: jax.Array) -> jax.Array:
        self.calls.append((("eigh",), (matrices,)))
        return jnp.zeros_like(matrices)

    def refreshed_basis(
        self, factor: jax.Array, basis: jax.Array, method: str
    ) -> tuple[jax.Array, jax.Array]:
        self.calls.append((("refresh", method), (factor, basis)))
        return jnp.zeros(factor.shape[:-1], jnp.int32), jnp.zeros_like(basis)

    def answers(self) -> list[Any]:
        """Each recorded call's answer, from one batched call per kind, method, size and
        dtype (the matrices of every call of that key, concatenated as one batch)."""
        keys: dict[tuple[Any, ...], list[int]] = {}
        for index, (kind, operands) in enumerate(self.calls):
            x = operands[0]
            keys.setdefault((*kind, x.shape[-1], x.dtype), []).append(index)
        answers: list[Any] = [None] * len(self.calls)
        for key, indices in keys.items():
            d = key[-2]
            members = [self.calls[i][1] for i in indices]
            batches = [
                jnp.concatenate([ops[k].reshape(-1, d, d) for ops in members])
                for k in range(len(members[0]))
            ]
            if key[0] == "eigh":
                solved = _in_chunks(lambda m: (DIRECT.eigenvectors(m),), batches)
            else:
                refresh = functools.partial(DIRECT.refreshed_basis, method=key[1])
                solved = _in_chunks(refresh, batches)
            start = 0
            for i, ops in zip(indices, members, strict=True):
                leading = ops[0].shape[:-2]
                count = ops[0].size // (d * d)
                parts = tuple(
                    x[start : start + count].reshape(*leading, *x.shape[1:]) for x in solved
                )
                answers[i] = parts if len(parts) > 1 else parts[0]
                start += count
        return answers


@dataclasses.dataclass
class _Answering(Solves):
    """Answers each call, in the recorded order, with its precomputed result."""

    answered: list[Any]
    taken: int = 0

    def _next(self) -> Any:
        answer = self.answered[self.taken]
        self.taken += 1
        return answer

    def eigenvectors(self, matrices: jax.Array) -> jax.Array:
        return self._next()

    def refreshed_basis(
        self, factor: jax.Array, basis: jax.Array, method: str
    ) -> tuple[jax.Array, jax.Array]:
        return self._next()


def stacked(step: Callable[[Solves], _Result]) -> _Result:
    """``step(solves)``, its solver calls answered from one batched call per kind, shape and
    dtype: ``step`` is traced (or, outside ``jit``, run) once recording them, then again
    taking the answers. ``step`` must make the same calls in the same order each time, with
    operands that no other call's answer feeds (see the module)."""
    recording = _Recording()
    step(recording)
    answering = _Answering(recording.answers())
    result = step(answering)
    assert answering.taken == len(answering.answered), "the two traces made other calls"
    return result
