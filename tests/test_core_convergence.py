"""Every alias actually minimises: Rosenbrock and an ill-conditioned quadratic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax

OPTIMIZERS = {
    "adam": lambda lr: adam_jax.adam(lr),
    "adamw": lambda lr: adam_jax.adamw(lr, weight_decay=1e-6),
    "nadam": lambda lr: adam_jax.nadam(lr),
    "nadamw": lambda lr: adam_jax.nadamw(lr, weight_decay=1e-6),
    "amsgrad": lambda lr: adam_jax.amsgrad(lr),
    "adam_l2": lambda lr: adam_jax.adam_l2(lr, weight_decay=1e-6),
    "adamax": lambda lr: adam_jax.adamax(lr),
    "adamaxw": lambda lr: adam_jax.adamaxw(lr, weight_decay=1e-6),
    "keras": lambda lr: adam_jax.adam(lr, eps_placement="keras"),
}


def _minimise(opt: optax.GradientTransformation, loss, x0: jax.Array, steps: int) -> jax.Array:
    @jax.jit
    def run(x):
        def step(carry, _):
            x, state = carry
            u, state = opt.update(jax.grad(loss)(x), state, x)
            return (optax.apply_updates(x, u), state), None

        (x, _), _ = jax.lax.scan(step, (x, opt.init(x)), None, length=steps)
        return x

    return run(x0)


def _rosenbrock(x: jax.Array) -> jax.Array:
    return (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_rosenbrock(name: str) -> None:
    """From (-1.2, 1), 5000 steps with a cosine-decayed learning rate reach the minimum (1, 1)."""
    schedule = optax.cosine_decay_schedule(0.1, 5000, alpha=1e-2)
    x = _minimise(OPTIMIZERS[name](schedule), _rosenbrock, jnp.asarray([-1.2, 1.0]), 5000)
    assert float(_rosenbrock(x)) < 1e-6, (name, x)
    np.testing.assert_allclose(np.asarray(x), [1.0, 1.0], atol=1e-2)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_quadratic(name: str) -> None:
    """An ill-conditioned quadratic (condition number 1e4) is minimised to 1e-6 of its start."""
    scales = jnp.logspace(-2, 2, 8)
    target = jnp.linspace(-1.0, 1.0, 8)

    def loss(x):
        return 0.5 * jnp.sum(scales * (x - target) ** 2)

    x0 = jnp.zeros((8,))
    schedule = optax.exponential_decay(5e-2, 200, 0.5)
    x = _minimise(OPTIMIZERS[name](schedule), loss, x0, 2000)
    assert float(loss(x)) < 1e-6 * float(loss(x0)), (name, float(loss(x)))
