"""Leaves in turn: a data dependency that makes XLA finish one leaf before it starts the next.

XLA schedules the independent per-leaf computations of an optimizer step as it likes; on CPU
it decodes the moments of every leaf before it encodes any, so that a compressed state (8-bit
or 4-bit codes, factored rows and columns) is alive as a whole float32 copy during the step.
:func:`after` makes a leaf's stored moments depend on the scales that the previous such leaf
stored (:func:`scales_of`: block scales, row and column maxima, factored rows and columns:
small arrays that exist only once that leaf's new moments do), so that the decoded moments of
one leaf at a time are alive. On CPU the core also makes a leaf's new codes depend on its
update, so that no fusion reads the old codes after the new ones overwrite them in place.

``jax.lax.optimization_barrier`` would say the same, but XLA:CPU removes barriers before it
schedules. On a TPU the arithmetic below is a few scalar kernels a leaf, and a barrier keeps
the same temporaries without them, so the core's leaves wait behind a barrier there
(:func:`in_turn`; GPT-2 small's 8-bit AdamW step compiled for a v5p: 1393 kernels against 2038,
1024 MiB of temporaries against 1031). Stochastic rounding's leaves and a leaf's row slices
keep the arithmetic there too: behind barriers a v5p held more (121 MiB against 24 at GPT-2
small, and 474 against 431). Elsewhere the dependency is arithmetic that XLA cannot fold away
and that leaves every value as it was: ``max(x, d)`` for each float array ``x`` of the inputs,
with ``d = -inf`` computed from the maximum of each previous array (``max(x, -inf)`` is ``x``
bit for bit for every float, ``-0.0`` included; a NaN stays a NaN), and a shift by a computed
zero for each integer array (8-bit codes, random keys). A dependency on the previous leaf's
codes as well (one more pass over them) costs time: the 8-bit step took 1.9x the unordered one
on CPU, against 1.02x with the scales alone (4-bit: 1.15x), for the same temporaries; one on a
single element lets XLA recompute part of the encoding for it and keeps more temporaries, not
fewer. On a leaf sharded over devices each maximum is one scalar all-reduce. Only leaves whose
storage :meth:`~adam_jax.MomentStorage.decodes` are put in turn; plain moments fuse as before.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

T = TypeVar("T")


def _minus_inf_after(previous: Any) -> jax.Array:
    """``-inf`` (float32) as a function of every array leaf of ``previous``."""
    # A complex array's real part is enough to depend on it.
    maxima = [
        jnp.max(jnp.real(x) if jnp.iscomplexobj(x) else x).astype(jnp.float32)
        for x in jax.tree.leaves(previous)
        if x.size
    ]
    # Each (m != m) is False or True (a NaN maximum): -inf * (1 + their count) is -inf and
    # never NaN; XLA keeps m != m for floats, so the product depends on every maximum.
    return -jnp.inf * (1 + sum(((m != m).astype(jnp.float32) for m in maxima), jnp.float32(0)))


def scales_of(stored: Any) -> list[jax.Array]:
    """The float arrays of stored forms (block scales, row and column maxima, factored rows and
    columns), or all their arrays when none is float: small arrays that exist only once a
    leaf's new moments do, so that waiting for them waits for the leaf."""
    arrays = jax.tree.leaves(stored)
    return [x for x in arrays if jnp.issubdtype(x.dtype, jnp.floating)] or arrays


def _waiting(floor: jax.Array, integers: bool) -> Any:
    """What gives an array a data dependency on ``floor`` (``-inf``, computed), unchanged."""
    # floor != -inf is always False: a zero shift that XLA cannot see is one.
    no_shift = floor != -jnp.inf

    def wait(x: Any) -> Any:
        dtype = jnp.result_type(x)
        if jnp.issubdtype(dtype, jnp.floating):
            return jnp.maximum(x, floor.astype(dtype))
        if integers and jnp.issubdtype(dtype, jnp.integer):
            return jax.lax.shift_right_logical(x, no_shift.astype(dtype))
        return x

    return wait


def after(previous: Any, inputs: T, *, integers: bool = True) -> T:
    """``inputs``, unchanged, computed on only once every array of ``previous`` is (nothing
    to wait for when ``previous`` is ``None``): each float and integer array of ``inputs`` gets
    a data dependency on them; with ``integers`` false, float arrays only (for inputs that a
    loop takes together: a shifted copy of large codes would be a copy)."""
    if previous is None:
        return inputs
    return jax.tree.map(_waiting(_minus_inf_after(previous), integers), inputs)


def behind_barrier(previous: Any, inputs: T) -> T:
    """``inputs``, unchanged, out of one ``optimization_barrier`` with ``previous``."""
    return jax.lax.optimization_barrier((previous, inputs))[1]


def in_turn(previous: Any, inputs: T) -> T:
    """``inputs`` once every array of ``previous`` exists: :func:`behind_barrier` on a TPU,
    :func:`after` elsewhere."""
    if previous is None:
        return inputs
    ordered: T = jax.lax.platform_dependent(
        inputs,
        tpu=functools.partial(behind_barrier, previous),
        default=functools.partial(after, previous),
    )
    return ordered


def copied_in_turn(arrays: list[jax.Array]) -> list[jax.Array]:
    """Copies of ``arrays`` made by arithmetic (as :func:`after` makes them, from their
    :func:`scales_of`), each once the copy before it exists, so that an array and its copy are
    the only two alive at a time."""
    wait = _waiting(_minus_inf_after(scales_of(arrays)), integers=True)
    copies: list[jax.Array] = []
    for x in arrays:
        if copies:
            x, _ = jax.lax.optimization_barrier((x, copies[-1]))
        copies.append(wait(x))
    return copies
