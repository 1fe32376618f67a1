"""SOAP's refresh by Cholesky QR on the device at hand, against Householder QR (issue 50).

    python -m benchmarks.soap_gpu_check

Prints, for batches of power iterates as SOAP's blocks produce them (full rank, rank-deficient,
rank one, nearly parallel columns from an unsettled basis, and columns each nearly orthogonal
to the others that span one dimension less, whose Gram matrix is singular though near the
identity entry by entry), in float32 on the default
device: how far each method's Q is from orthonormal, and how far Cholesky QR's Q is from
Householder QR's (signs aligned); then 40 steps of SOAP (blocked, on a small tree) with each
method, the largest difference between their params beside how far the params moved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from adam_jax.rules import orthonormal


def _iterates(rng: np.random.Generator, n: int, d: int, rank: int, settled: bool) -> tuple:
    xs, olds = [], []
    for _ in range(n):
        a = rng.standard_normal((d, rank))
        factor = a @ a.T
        if settled:
            old = np.linalg.qr(np.linalg.eigh(factor)[1] + 0.1 * rng.standard_normal((d, d)))[0]
        else:
            old = np.linalg.qr(rng.standard_normal((d, d)))[0]
        xs.append(factor @ old)
        olds.append(old)
    return np.stack(xs), np.stack(olds)


def _spanning_one_less(rng: np.random.Generator, n: int, d: int) -> tuple:
    """Rotated columns of ``I - 1/d`` (inner products -1/(d - 1) at unit norm; rank d - 1)."""
    rotations = [np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(2 * n)]
    x = np.stack([r @ (np.eye(d) - 1.0 / d) for r in rotations[:n]])
    return x, np.stack(rotations[n:])


def _orthonormality(q: np.ndarray) -> float:
    q = q.astype(np.float64)
    return float(np.max(np.abs(np.swapaxes(q, -1, -2) @ q - np.eye(q.shape[-1]))))


def main() -> None:
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    rng = np.random.default_rng(0)
    d, n = 128, 16
    cases = [
        (name, *_iterates(rng, n, d, rank, settled))
        for name, rank, settled in [
            ("full rank, settled", 2 * d, True),
            ("rank 16, settled", 16, True),
            ("rank one, settled", 1, True),
            ("full rank, unsettled", 2 * d, False),
        ]
    ]
    cases.append(("spanning one less", *_spanning_one_less(rng, n, d)))
    for name, x, old in cases:
        xj, oldj = jnp.asarray(x, jnp.float32), jnp.asarray(old, jnp.float32)
        qr = np.asarray(jax.jit(lambda a, b: orthonormal(a, b, "qr"))(xj, oldj))
        chol = np.asarray(jax.jit(lambda a, b: orthonormal(a, b, "cholesky_qr"))(xj, oldj))
        aligned = chol * np.sign(np.sum(chol * qr, axis=-2, keepdims=True))
        print(
            f"  {name:22s}: |Q^T Q - I| qr {_orthonormality(qr):.1e}, cholesky_qr "
            f"{_orthonormality(chol):.1e}; |Q_chol - Q_qr| {np.max(np.abs(aligned - qr)):.1e}"
        )
    import adam_jax

    params = {
        "w": jnp.asarray(rng.standard_normal((256, 192)), jnp.float32),
        "e": jnp.asarray(rng.standard_normal((512, 64)), jnp.float32),
    }
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
        for _ in range(40)
    ]
    finals = {}
    for method in ("qr", "cholesky_qr"):
        tx = adam_jax.soap(3e-3, block_size=64, orthogonalization=method)
        state, update, p = tx.init(params), jax.jit(tx.update), params
        for g in grads:
            u, state = update(g, state, p)
            p = jax.tree.map(lambda a, b: a + b, p, u)
        finals[method] = p
    diff = max(float(jnp.max(jnp.abs(finals["qr"][k] - finals["cholesky_qr"][k]))) for k in params)
    moved = max(float(jnp.max(jnp.abs(finals["qr"][k] - params[k]))) for k in params)
    print(
        f"  SOAP, 40 steps, blocks of 64: |params_chol - params_qr| {diff:.1e}, moved {moved:.1e}"
    )


if __name__ == "__main__":
    main()
