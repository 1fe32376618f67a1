"""SOAP's first bases by a refresh of the identity (``first_basis="power"``) instead of ``eigh``.

* The update of the second step (Adam's first, in the bases the first step built) is a float64
  NumPy reference's to 1e-10: the bases the Q of the QR decomposition of each factor's columns
  sorted by decreasing diagonal, by Householder QR and by Cholesky QR. The update does not see
  the bases' column signs, on which QR methods may differ.
* Rank-deficient factors (a wide leaf's) get orthonormal bases and finite updates.
* The step lowered for the CPU, a GPU and a TPU holds no eigendecomposition, leaf by leaf or
  stacked; with ``"eigh"`` it does (so the check can fail).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax

B1, B2, EPS = 0.9, 0.99, 1e-8


def _power_basis(factor: np.ndarray) -> np.ndarray:
    """The identity refreshed: the factor's columns by decreasing diagonal, orthonormalized."""
    order = np.argsort(-np.diag(factor), kind="stable")
    return np.linalg.qr(factor[:, order])[0]


def _reference_second_update(g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
    """SOAP's second update of a matrix leaf in float64: Adam's first step (bias-corrected in
    the step size) on ``g2`` rotated into the first step's power bases, rotated back."""
    q_left, q_right = _power_basis(g1 @ g1.T), _power_basis(g1.T @ g1)
    rotated = q_left.T @ g2 @ q_right
    mu, nu = (1 - B1) * rotated, (1 - B2) * rotated**2
    direction = np.sqrt(1 - B2) / (1 - B1) * mu / (np.sqrt(nu) + EPS)
    return q_left @ direction @ q_right.T


@pytest.mark.parametrize("orthogonalization", ["qr", "cholesky_qr"])
@pytest.mark.parametrize("stack_blocks", [False, True], ids=["by leaf", "stacked"])
def test_power_start_steps_as_the_reference(
    orthogonalization: str, stack_blocks: bool, x64: None
) -> None:
    rng = np.random.default_rng(0)
    g1 = {"w": rng.normal(size=(6, 6)), "u": rng.normal(size=(5, 5))}
    g2 = {"w": rng.normal(size=(6, 6)), "u": rng.normal(size=(5, 5))}
    tx = adam_jax.scale_by_soap(
        B1,
        B2,
        eps=EPS,
        first_basis="power",
        orthogonalization=orthogonalization,
        stack_blocks=stack_blocks,
    )
    state = tx.init(jax.tree.map(jnp.asarray, g1))
    first, state = tx.update(jax.tree.map(jnp.asarray, g1), state)
    second, _ = tx.update(jax.tree.map(jnp.asarray, g2), state)
    for name in g1:
        np.testing.assert_array_equal(first[name], 0.0)
        np.testing.assert_allclose(
            second[name],
            _reference_second_update(g1[name], g2[name]),
            rtol=1e-10,
            atol=1e-10,
            err_msg=name,
        )


def test_rank_deficient_factors_get_orthonormal_bases() -> None:
    """A 3 x 8 gradient's right factor (8 x 8) has rank 3: its power basis is still orthonormal,
    completed by the sorted identity, and the steps stay finite through a refresh."""
    rng = np.random.default_rng(1)
    tx = adam_jax.scale_by_soap(first_basis="power", precondition_frequency=2)
    params = jnp.zeros((3, 8))
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(4):
        updates, state = update(jnp.asarray(rng.normal(size=(3, 8)), jnp.float32), state)
        assert np.all(np.isfinite(updates))
    bases = np.asarray(state.q)  # the left basis (3 x 3), then the right one (8 x 8)
    right = bases[9:].reshape(8, 8)
    np.testing.assert_allclose(right.T @ right, np.eye(8), atol=1e-5)


def _eigendecompositions(tx: optax.GradientTransformation, params: Any, platform: str) -> int:
    """The eigendecomposition calls in ``tx``'s step exported for ``platform``."""
    exported = jax.export.export(jax.jit(tx.update), platforms=[platform])
    text = exported(params, tx.init(params), params).mlir_module()
    return len(re.findall(r"custom_call @\w*(?:syevd|Eigh)", text))


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
@pytest.mark.parametrize("stack_blocks", [False, True], ids=["by leaf", "stacked"])
def test_power_start_compiles_no_eigendecomposition(platform: str, stack_blocks: bool) -> None:
    """The step lowered for each platform (the CPU's branch per leaf, the accelerators' stacked
    calls) holds no eigendecomposition with ``"power"``, and holds one with ``"eigh"``."""
    params = {"w": jnp.ones((16, 24)), "v": jnp.ones((8, 8))}

    def count(first_basis: str) -> int:
        tx = adam_jax.soap(0.01, block_size=8, first_basis=first_basis, stack_blocks=stack_blocks)
        return _eigendecompositions(tx, params, platform)

    assert count("eigh") > 0
    assert count("power") == 0


def test_first_basis_is_checked() -> None:
    with pytest.raises(ValueError, match=r"first_basis must be one of \('eigh', 'power'\)"):
        adam_jax.soap(0.01, first_basis="svd")
