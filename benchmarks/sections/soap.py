"""``soap``: SOAP's step against AdamW's on transformer matrices, and the share of it spent
refreshing the eigenbases.

SOAP refreshes its eigenbases (power iteration and QR) every ``precondition_frequency`` steps,
so one step in ten at the default is dearer than the rest. Each runner here is a jitted,
donating cycle of ``FREQUENCY`` optimizer steps (update + apply, a ``fori_loop``) on the
transformer-like tree of ``benchmarks.models`` (4 blocks; d x d attention, d x 4d MLP and
256 x d embedding matrices, all preconditioned): ``adam_jax.adamw``, ``adam_jax.soap`` at
``precondition_frequency=FREQUENCY`` (one refresh per cycle) and ``adam_jax.soap`` that never
refreshes after its first step, and ``adam_jax.soap`` with ``block_size=BLOCK_SIZE`` (each
matrix cut into blocks of at most 128 x 128, each its own SOAP: no factor wider than 128),
timed in the same rounds (interleaved). ``ratio_vs_adamw`` is the median over rounds of SOAP's
cycle time over AdamW's (``block_ratio_vs_adamw`` alike for the blocked SOAP);
``eigenbasis_share``, the median of 1 - (never refreshing) / (refreshing): the share of SOAP's
time that the refreshes take (``block_eigenbasis_share`` alike for the blocked SOAP, against
one that never refreshes either).

More runners, in the same rounds: ``compressed_*``, SOAP at ``block_size=BLOCK_SIZE`` with
the compressed storages that fit GPT-2 small's state in 12 bytes a parameter (bfloat16 factors
and bases, whose decoded bases are rectified at every step, and 8-bit moments); and
``block_products_*``, the six products alone that blocked SOAP computes per block at every
step (two factor updates, two rotations into the eigenbasis and two back), as batched
``dot_general``s over the tree's matrices cut into blocks of at most ``BLOCK_SIZE`` (what
those products cost on this machine, timed apart from the rest of the step).
``block_products_bfloat16_*`` is the same with every operand rounded to bfloat16 and float32
sums (XLA:CPU's bfloat16 dot runs about twice as fast as its float32 one where the left operand
is contracted on its last dimension, so the transposes that the other forms need are made
first); ``block_qr_*``, the QR decompositions of one refresh of every block's bases (one matrix
at a time, as the step runs them on CPU), per step of a ``precondition_frequency=FREQUENCY``
cycle. Together, a floor under blocked SOAP's step on this machine that owes nothing to the
rest of the step.
``unrectified_*`` is the compressed SOAP with ``basis_rectification=0`` (its bases used as
decoded: no Björck products); ``practical_*``, that with its second moment in bfloat16
(``PRACTICAL``: the setting whose race loss stays within 1% of float32 SOAP's).

The refresh's orthonormalization (issue 50): the default, ``"auto"``, is Householder QR on the
CPU and Cholesky QR elsewhere; ``other_soap_*`` and ``other_practical_*`` are SOAP and the
setting to use with the method the default does not take on the backend
(``other_orthogonalization``); ``block_cholesky_qr_*``, every block's refresh by Cholesky QR,
as ``block_qr_*`` (``block_cholesky_qr_over_qr``: its time over the QRs'); ``block_eigh_ms``,
the first step's eigendecompositions of every block's factors, paid once a run.
"""

from __future__ import annotations

import functools
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import optax

import adam_jax
from adam_jax.rules import orthonormal
from benchmarks.harness import LR, Row, Runner, Settings, copy_tree, interleaved
from benchmarks.models import transformer_params

FREQUENCY = 10
LAYERS = 4
BLOCK_SIZE = 128
NEVER = 2**30  # a precondition_frequency no run reaches: the bases of the first step stay
WIDTHS = (64, 256)
QUICK_WIDTHS = (16,)
REPEATS = 10
#: Blocks and the storages that keep GPT-2 small's SOAP state under 12 bytes a parameter.
COMPRESSED: dict[str, Any] = {
    "block_size": BLOCK_SIZE,
    "factor_dtype": jnp.bfloat16,
    "basis_dtype": jnp.bfloat16,
    **adam_jax.eight_bit_moments(),
}
#: The compressed storages with the second moment in bfloat16, bases used as decoded: the
#: race's held-out loss within 1% of float32 SOAP's where 8-bit nu is not (docs/lm_race.md),
#: 11 bytes a parameter at GPT-2 small's shapes.
PRACTICAL: dict[str, Any] = {**COMPRESSED, "nu_dtype": jnp.bfloat16, "basis_rectification": 0}


def cycle(tx: optax.GradientTransformation) -> Any:
    """``FREQUENCY`` steps of ``tx`` on fixed gradients, as one call."""

    def steps(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
        def body(_: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
            params, state = carry
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return jax.lax.fori_loop(0, FREQUENCY, body, (params, state))

    return steps


def matrix_blocks(params: Any) -> dict[tuple[int, int], jax.Array]:
    """The tree's matrices cut into blocks of at most ``BLOCK_SIZE`` a side, batched by shape
    (matrices that the size does not divide are left out)."""
    batches: dict[tuple[int, int], list[jax.Array]] = {}
    for p in jax.tree.leaves(params):
        if p.ndim != 2:
            continue
        (r, c), (br, bc) = p.shape, (min(BLOCK_SIZE, p.shape[0]), min(BLOCK_SIZE, p.shape[1]))
        if r % br or c % bc:
            continue
        cut = p.reshape(r // br, br, c // bc, bc).transpose(0, 2, 1, 3).reshape(-1, br, bc)
        batches.setdefault((br, bc), []).append(cut)
    return {shape: jnp.concatenate(parts) for shape, parts in batches.items()}


def block_products(blocks: Any, _: Any, bases: Any) -> tuple[Any, Any]:
    """``FREQUENCY`` times, per batch of blocks ``G`` (bases ``L``, ``R``): the factor products
    ``G G^T`` and ``G^T G``, and ``L^T G R`` rotated back by ``L . R^T``."""

    def batched(a: jax.Array, b: jax.Array, ca: int, cb: int) -> jax.Array:
        return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((0,), (0,))))

    def body(_: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
        blocks, bases = carry
        new_blocks, new_bases = {}, {}
        for shape, g in blocks.items():
            left, right = bases[shape]
            rotated = batched(batched(g, left, 1, 1), right, 1, 1)
            back = batched(batched(rotated, left, 1, 2), right, 1, 2)
            new_blocks[shape] = back
            new_bases[shape] = (batched(g, g, 2, 2), batched(g, g, 1, 1))
        return new_blocks, new_bases

    return jax.lax.fori_loop(0, FREQUENCY, body, (blocks, bases))


def _bfloat16_product(a: jax.Array, b: jax.Array, cb: int) -> jax.Array:
    """``a`` contracted on its last dimension with ``b`` on ``cb``, per block, from bfloat16
    operands into float32 sums."""
    dims = (((2,), (cb,)), ((0,), (0,)))
    bf16 = jnp.bfloat16
    return jax.lax.dot_general(
        a.astype(bf16), b.astype(bf16), dims, preferred_element_type=jnp.float32
    )


def _transposed(x: jax.Array) -> jax.Array:
    """Each block of ``x`` (of an even width) transposed, as a copy: XLA folds a plain swap of
    the two axes into the product, which then runs in float32."""
    n, r, c = x.shape
    return x.reshape(n, r, 2, c // 2).transpose(0, 2, 3, 1).reshape(n, c, r)


def block_products_bfloat16(blocks: Any, _: Any, bases: Any) -> tuple[Any, Any]:
    """:func:`block_products` with bfloat16 operands: ``G R``, then ``L^T (G R)``; ``X R^T``
    then ``L (X R^T)``; ``G G^T`` and ``G^T G``."""

    def body(_: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
        blocks, bases = carry
        new_blocks, new_bases = {}, {}
        for shape, g in blocks.items():
            left, right = bases[shape]
            rotated = _bfloat16_product(_transposed(left), _bfloat16_product(g, right, 1), 1)
            back = _bfloat16_product(left, _bfloat16_product(rotated, right, 2), 1)
            gt = _transposed(g)
            new_blocks[shape] = back
            new_bases[shape] = (_bfloat16_product(g, g, 2), _bfloat16_product(gt, gt, 2))
        return new_blocks, new_bases

    return jax.lax.fori_loop(0, FREQUENCY, body, (blocks, bases))


def block_qrs(factors: Any, _: Any, unused: Any) -> tuple[Any, Any]:
    """The Q of every block's bases' power-iteration products, one matrix at a time."""
    each = functools.partial(jax.lax.map, lambda m: jnp.linalg.qr(m)[0])
    return jax.tree.map(each, factors), unused


def block_cholesky_qrs(factors: Any, _: Any, unused: Any) -> tuple[Any, Any]:
    """The Q of every block's bases' power-iteration products by Cholesky QR (batched where
    the step batches it: off the CPU), their previous bases the identity."""

    def each(m: jax.Array) -> jax.Array:
        eye = jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m.shape)
        return orthonormal(m, eye, "cholesky_qr")

    return jax.tree.map(each, factors), unused


def block_eighs(factors: Any, _: Any, unused: Any) -> tuple[Any, Any]:
    """The eigenvectors of every block's factors, as SOAP's first step computes them (one
    matrix at a time on the CPU, batched elsewhere)."""

    def vectors(x: jax.Array) -> jax.Array:
        return jnp.linalg.eigh(x)[1]

    def each(m: jax.Array) -> jax.Array:
        if m.ndim == 2:
            return vectors(m)
        # SOAP's batching (adam_jax's private each_matrix): one block at a time on the CPU,
        # whose batched kernels can wait on each other in XLA's thread pool.
        return jax.lax.platform_dependent(m, cpu=lambda m: jax.lax.map(vectors, m), default=vectors)

    return jax.tree.map(each, factors), unused


def median_ratio(runner: Runner, reference: Runner) -> float:
    """The median over rounds of ``runner``'s time over ``reference``'s in the same round."""
    return statistics.median(r / a for r, a in zip(runner.times, reference.times, strict=True))


def measure(widths: tuple[int, ...], repeats: int, layers: int = LAYERS) -> list[Row]:
    rows = []
    # The orthogonalization that the default ("auto") does not take on this backend.
    other = "cholesky_qr" if jax.default_backend() == "cpu" else "qr"
    for d in widths:
        params = transformer_params(jax.random.key(0), layers=layers, d=d, ff=4 * d, seq=64)
        grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) * 1e-2, params)
        num_params = sum(p.size for p in jax.tree.leaves(params))
        candidates = {
            "adam_jax.adamw": adam_jax.adamw(LR),
            "adam_jax.soap": adam_jax.soap(LR, precondition_frequency=FREQUENCY),
            "soap, never refreshing": adam_jax.soap(LR, precondition_frequency=NEVER),
            f"soap, block_size={BLOCK_SIZE}": adam_jax.soap(
                LR, precondition_frequency=FREQUENCY, block_size=BLOCK_SIZE
            ),
            f"soap, block_size={BLOCK_SIZE}, never refreshing": adam_jax.soap(
                LR, precondition_frequency=NEVER, block_size=BLOCK_SIZE
            ),
            f"soap, block_size={BLOCK_SIZE}, compressed": adam_jax.soap(
                LR, precondition_frequency=FREQUENCY, **COMPRESSED
            ),
            f"soap, block_size={BLOCK_SIZE}, compressed, basis_rectification=0": adam_jax.soap(
                LR, precondition_frequency=FREQUENCY, basis_rectification=0, **COMPRESSED
            ),
            f"soap, block_size={BLOCK_SIZE}, compressed, bfloat16 nu, unrectified": adam_jax.soap(
                LR, precondition_frequency=FREQUENCY, **PRACTICAL
            ),
            f"adam_jax.soap, {other}": adam_jax.soap(
                LR, precondition_frequency=FREQUENCY, orthogonalization=other
            ),
            f"the setting to use, {other}": adam_jax.soap(
                LR, precondition_frequency=FREQUENCY, orthogonalization=other, **PRACTICAL
            ),
        }
        runners = {
            name: Runner(name, cycle(tx), copy_tree(params), grads, tx.init(params))
            for name, tx in candidates.items()
        }
        blocks = matrix_blocks(params)
        bases = {
            (r, c): (jnp.tile(jnp.eye(r), (len(b), 1, 1)), jnp.tile(jnp.eye(c), (len(b), 1, 1)))
            for (r, c), b in blocks.items()
        }
        # Each block's two factors (G G^T, G^T G): the matrices a refresh orthonormalizes.
        factors = {
            shape: (jnp.einsum("nij,nkj->nik", g, g), jnp.einsum("nji,njk->nik", g, g))
            for shape, g in blocks.items()
        }
        runners["block products"] = Runner(
            "block products", block_products, copy_tree(blocks), None, copy_tree(bases)
        )
        runners["block products, bfloat16"] = Runner(
            "block products, bfloat16", block_products_bfloat16, blocks, None, bases
        )
        # Each runner donates its factors: a copy each.
        runners["block QRs"] = Runner(
            "block QRs", block_qrs, copy_tree(factors), None, jnp.zeros(())
        )
        runners["block Cholesky QRs"] = Runner(
            "block Cholesky QRs", block_cholesky_qrs, copy_tree(factors), None, jnp.zeros(())
        )
        runners["block eighs"] = Runner("block eighs", block_eighs, factors, None, jnp.zeros(()))
        interleaved(list(runners.values()), repeats)
        (
            adamw,
            soap,
            never,
            blocked,
            blocked_never,
            compressed,
            unrectified,
            practical,
            soap_other,
            practical_other,
            products,
            products_bf16,
            qrs,
            cholesky_qrs,
            eighs,
        ) = runners.values()
        state_bytes = {
            name: sum(x.nbytes for x in jax.tree.leaves(runners[name].state)) / num_params
            for name in candidates
        }

        row = {
            "tree": f"transformer-like, d = {d}",
            "num_params": num_params,
            "precondition_frequency": FREQUENCY,
            "adamw_ms_per_step": 1e3 * adamw.median / FREQUENCY,
            "soap_ms_per_step": 1e3 * soap.median / FREQUENCY,
            "ratio_vs_adamw": median_ratio(soap, adamw),
            "eigenbasis_share": statistics.median(
                1 - n / s for n, s in zip(never.times, soap.times, strict=True)
            ),
            "block_size": BLOCK_SIZE,
            "block_soap_ms_per_step": 1e3 * blocked.median / FREQUENCY,
            "block_ratio_vs_adamw": median_ratio(blocked, adamw),
            "block_eigenbasis_share": statistics.median(
                1 - n / b for n, b in zip(blocked_never.times, blocked.times, strict=True)
            ),
            "block_state_bytes_per_param": state_bytes[blocked.name],
            "compressed_soap_ms_per_step": 1e3 * compressed.median / FREQUENCY,
            "compressed_ratio_vs_adamw": median_ratio(compressed, adamw),
            "compressed_state_bytes_per_param": state_bytes[compressed.name],
            "unrectified_soap_ms_per_step": 1e3 * unrectified.median / FREQUENCY,
            "unrectified_ratio_vs_adamw": median_ratio(unrectified, adamw),
            "practical_soap_ms_per_step": 1e3 * practical.median / FREQUENCY,
            "practical_ratio_vs_adamw": median_ratio(practical, adamw),
            "practical_state_bytes_per_param": state_bytes[practical.name],
            "block_products_ms_per_step": 1e3 * products.median / FREQUENCY,
            "block_products_ratio_vs_adamw": median_ratio(products, adamw),
            "block_products_params": sum(b.size for b in blocks.values()),
            "block_products_bfloat16_ms_per_step": 1e3 * products_bf16.median / FREQUENCY,
            "block_products_bfloat16_ratio_vs_adamw": median_ratio(products_bf16, adamw),
            "block_qr_ms_per_step": 1e3 * qrs.median / FREQUENCY,
            "block_qr_ratio_vs_adamw": median_ratio(qrs, adamw),
            "block_qr_count": sum(2 * len(g) for g in blocks.values()),
            "other_orthogonalization": other,
            "other_soap_ratio_vs_adamw": median_ratio(soap_other, adamw),
            "other_practical_ratio_vs_adamw": median_ratio(practical_other, adamw),
            "block_cholesky_qr_ms_per_step": 1e3 * cholesky_qrs.median / FREQUENCY,
            "block_cholesky_qr_ratio_vs_adamw": median_ratio(cholesky_qrs, adamw),
            "block_cholesky_qr_over_qr": median_ratio(cholesky_qrs, qrs),
            # The first step's eigendecompositions, once a run (not per step).
            "block_eigh_ms": 1e3 * eighs.median,
            "repeats": repeats,
        }
        rows.append(row)
        print(
            f"  d = {d:4d} ({num_params} params): adamw {row['adamw_ms_per_step']:.2f} ms, "
            f"soap {row['soap_ms_per_step']:.2f} ms (x{row['ratio_vs_adamw']:.2f}), "
            f"eigenbasis updates {100 * row['eigenbasis_share']:.0f}%; block_size={BLOCK_SIZE} "
            f"{row['block_soap_ms_per_step']:.2f} ms (x{row['block_ratio_vs_adamw']:.2f}, "
            f"refreshes {100 * row['block_eigenbasis_share']:.0f}%), "
            f"compressed {row['compressed_soap_ms_per_step']:.2f} ms "
            f"(x{row['compressed_ratio_vs_adamw']:.2f}, "
            f"{row['compressed_state_bytes_per_param']:.2f} B/param), without rectification "
            f"{row['unrectified_soap_ms_per_step']:.2f} ms "
            f"(x{row['unrectified_ratio_vs_adamw']:.2f}), with bfloat16 nu and without "
            f"rectification {row['practical_soap_ms_per_step']:.2f} ms "
            f"(x{row['practical_ratio_vs_adamw']:.2f}, "
            f"{row['practical_state_bytes_per_param']:.2f} B/param); the products alone "
            f"{row['block_products_ms_per_step']:.2f} ms "
            f"(x{row['block_products_ratio_vs_adamw']:.2f}), in bfloat16 "
            f"{row['block_products_bfloat16_ms_per_step']:.2f} ms "
            f"(x{row['block_products_bfloat16_ratio_vs_adamw']:.2f}); the refreshes' "
            f"{row['block_qr_count']} QRs {row['block_qr_ms_per_step']:.2f} ms a step "
            f"(x{row['block_qr_ratio_vs_adamw']:.2f}), by Cholesky QR "
            f"{row['block_cholesky_qr_ms_per_step']:.2f} ms "
            f"({row['block_cholesky_qr_over_qr']:.2f}x the QRs'); the first step's eighs "
            f"{row['block_eigh_ms']:.1f} ms once. With orthogonalization={other!r}: soap "
            f"x{row['other_soap_ratio_vs_adamw']:.2f}, the setting to use "
            f"x{row['other_practical_ratio_vs_adamw']:.2f}",
            flush=True,
        )
        for runner in runners.values():
            runner.release()
    return rows


def run(settings: Settings) -> list[Row]:
    return measure(QUICK_WIDTHS if settings.quick else WIDTHS, settings.repeats_or(REPEATS))
