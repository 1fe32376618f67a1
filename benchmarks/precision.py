"""float32 vs float64: how far each Adam implementation's float32 trajectory drifts.

Runs Adam (and AMSGrad) for ``--steps`` steps on a fixed random problem, in float32 and in
float64, for adam_jax, optax and PyTorch (``torch.optim.Adam``, if torch is importable), and
prints the maximum relative error of the float32 parameter trajectory against the float64 run
of the same implementation::

    max_t ||p32_t - p64_t||_inf / ||p64_t||_inf

The problem is a noisy, badly scaled quadratic: ``g_t(p) = a * (p - c) + s * n_t`` with
curvatures ``a`` and noise scales ``s`` spread over four orders of magnitude. The gradient is
computed in float64 NumPy from the current parameters and then rounded to the run's dtype, so
every implementation sees gradients computed the same way and only the optimizer arithmetic
differs. Note that ``optax.amsgrad`` takes the maximum of the *bias-corrected* second moment
(a different algorithm from PyTorch's / adam_jax's maximum of the raw moment); each float32 run
is compared with the float64 run of the same implementation.

A second table isolates the arithmetic of one update: every implementation is fed the same
float32 gradient sequence (an open loop: the params do not move, torch's are reset to zero
before each step so that ``p.addcdiv_`` returns the update exactly) and each float32 update is
compared with the float64 formula evaluated on the same gradients::

    max_t ||u32_t - u64_t||_inf / ||u64_t||_inf

Usage::

    python -m benchmarks.precision [--steps 500] [--size 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

Problem = tuple[np.ndarray, Callable[[np.ndarray, int], np.ndarray]]


def make_problem(size: int, steps: int, seed: int) -> Problem:
    """Initial params and the float64 gradient function ``grad(p, t)``."""
    rng = np.random.default_rng(seed)
    curvature = 10.0 ** rng.uniform(-2, 2, size)
    target = rng.standard_normal(size)
    noise_scale = 10.0 ** rng.uniform(-2, 1, size)
    noise = rng.standard_normal((steps, size))
    p0 = rng.standard_normal(size)

    def grad(p: np.ndarray, t: int) -> np.ndarray:
        return curvature * (p.astype(np.float64) - target) + noise_scale * noise[t]

    return p0, grad


def run_optax_like(make_opt, problem: Problem, steps: int, dtype) -> np.ndarray:
    """Trajectory of an optax GradientTransformation (adam_jax or optax) in ``dtype``."""
    import jax
    import jax.numpy as jnp
    import optax

    p0, grad = problem
    with jax.enable_x64(dtype == np.float64):
        opt = make_opt()
        params = jnp.asarray(p0, dtype)
        state = opt.init(params)

        @jax.jit
        def step(params, state, g):
            updates, state = opt.update(g, state, params)
            return optax.apply_updates(params, updates), state

        traj = []
        for t in range(steps):
            g = jnp.asarray(grad(np.asarray(params), t).astype(dtype))
            params, state = step(params, state, g)
            traj.append(np.asarray(params, np.float64))
    return np.stack(traj)


def run_torch(problem: Problem, steps: int, dtype, lr: float, amsgrad: bool) -> np.ndarray:
    """Trajectory of ``torch.optim.Adam`` (single-tensor CPU path) in ``dtype``."""
    import torch

    p0, grad = problem
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    p = torch.tensor(p0, dtype=tdtype, requires_grad=True)
    opt = torch.optim.Adam([p], lr=lr, amsgrad=amsgrad, foreach=False)
    traj = []
    for t in range(steps):
        g = grad(p.detach().numpy(), t).astype(dtype)
        p.grad = torch.tensor(g, dtype=tdtype)
        opt.step()
        traj.append(p.detach().numpy().astype(np.float64))
    return np.stack(traj)


def updates_float64(grads: np.ndarray, lr: float, amsgrad: bool) -> np.ndarray:
    """The Adam / AMSGrad (PyTorch semantics) updates in float64 NumPy, written out."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    m = np.zeros(grads.shape[1])
    v = np.zeros(grads.shape[1])
    v_max = np.zeros(grads.shape[1])
    out = []
    for t, g in enumerate(grads.astype(np.float64), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        v_max = np.maximum(v_max, v)
        v_used = v_max if amsgrad else v
        out.append(-lr * (m / (1 - b1**t)) / (np.sqrt(v_used / (1 - b2**t)) + eps))
    return np.stack(out)


def updates_optax_like(make_opt, grads: np.ndarray) -> np.ndarray:
    """float32 updates of an optax GradientTransformation on an open-loop gradient sequence."""
    import jax
    import jax.numpy as jnp

    opt = make_opt()
    params = jnp.zeros(grads.shape[1], jnp.float32)

    @jax.jit
    def run(gs):
        def step(state, g):
            u, state = opt.update(g, state, params)
            return state, u

        return jax.lax.scan(step, opt.init(params), gs)[1]

    return np.asarray(run(jnp.asarray(grads)), np.float64)


def updates_torch(grads: np.ndarray, lr: float, amsgrad: bool) -> np.ndarray:
    """float32 updates of torch.optim.Adam: params reset to 0 before each step."""
    import torch

    p = torch.zeros(grads.shape[1], dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([p], lr=lr, amsgrad=amsgrad, foreach=False)
    out = []
    for g in grads:
        with torch.no_grad():
            p.zero_()
        p.grad = torch.tensor(g)
        opt.step()
        out.append(p.detach().numpy().astype(np.float64))
    return np.stack(out)


def max_relative_error(traj32: np.ndarray, traj64: np.ndarray) -> float:
    """max over steps of ||p32 - p64||_inf / ||p64||_inf."""
    err = np.abs(traj32 - traj64).max(axis=1) / np.abs(traj64).max(axis=1)
    return float(err.max())


def main() -> None:
    """Prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    import optax

    import adam_jax

    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False

    problem = make_problem(args.size, args.steps, args.seed)
    lr = args.lr
    rows: list[tuple[str, str, float]] = []
    for algorithm, ours, theirs, amsgrad in [
        ("adam", lambda: adam_jax.adam(lr), lambda: optax.adam(lr), False),
        ("amsgrad", lambda: adam_jax.amsgrad(lr), lambda: optax.amsgrad(lr), True),
    ]:
        for name, make in [("adam_jax", ours), ("optax", theirs)]:
            t32 = run_optax_like(make, problem, args.steps, np.float32)
            t64 = run_optax_like(make, problem, args.steps, np.float64)
            rows.append((algorithm, name, max_relative_error(t32, t64)))
        if have_torch:
            t32 = run_torch(problem, args.steps, np.float32, lr, amsgrad)
            t64 = run_torch(problem, args.steps, np.float64, lr, amsgrad)
            rows.append((algorithm, "torch.optim.Adam", max_relative_error(t32, t64)))

    p0, grad = problem
    grads = np.stack([grad(p0, t) for t in range(args.steps)]).astype(np.float32)
    update_rows: list[tuple[str, str, float]] = []
    for algorithm, ours, theirs, amsgrad in [
        ("adam", lambda: adam_jax.adam(lr), lambda: optax.adam(lr), False),
        ("amsgrad", lambda: adam_jax.amsgrad(lr), None, True),
    ]:
        truth = updates_float64(grads, lr, amsgrad)
        update_rows.append(
            (algorithm, "adam_jax", max_relative_error(updates_optax_like(ours, grads), truth))
        )
        if theirs is not None:  # optax.amsgrad is a different algorithm: no common truth
            u = updates_optax_like(theirs, grads)
            update_rows.append((algorithm, "optax", max_relative_error(u, truth)))
        if have_torch:
            u = updates_torch(grads, lr, amsgrad)
            update_rows.append((algorithm, "torch.optim.Adam", max_relative_error(u, truth)))

    print(
        f"Max relative error of the float32 trajectory vs the float64 run "
        f"({args.steps} steps, {args.size} params, lr={lr:g}, seed={args.seed})"
    )
    print(f"{'algorithm':<10} {'implementation':<18} {'max rel. error':>15}")
    for algorithm, name, err in rows:
        print(f"{algorithm:<10} {name:<18} {err:>15.3e}")
    print()
    print("Max relative error of one float32 update vs the float64 formula (open loop)")
    print(f"{'algorithm':<10} {'implementation':<18} {'max rel. error':>15}")
    for algorithm, name, err in update_rows:
        print(f"{algorithm:<10} {name:<18} {err:>15.3e}")
    if not have_torch:
        print("(torch not importable: PyTorch rows skipped)")


if __name__ == "__main__":
    main()
