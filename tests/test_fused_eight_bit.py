"""The fused 8-bit Adam leaf step (``BlockwiseQuantized(kernel=...)``, a Pallas kernel).

In Pallas' interpret mode on CPU the kernel's updates, codes, scales and params are bit for bit
those of today's XLA path, over several steps, for ragged last blocks, matrices of column and
row blocks, several leaves, Adam and AdamW with their options; leaves the kernel does not
cover keep the XLA path; forcing the kernel where it cannot run fails in one line; exported for
CUDA, the step holds the kernel's Triton call.

Both programs are compiled with XLA's algebraic simplifier off (``AS_WRITTEN``), so that each
computes the float32 operations as written. With it on, XLA:CPU rewrites some divisions by a
broadcast scalar into multiplications by its reciprocal (``x / c1`` into ``x * (1 / c1)``)
depending on the rest of the program, which differs between the two: the results can then
differ in the last bit of an update and, rarely, by one code
(``test_with_xla_rewrites_codes_differ_by_at_most_one_step``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax
from adam_jax.quantization import BlockwiseQuantized

STEPS = 3
#: Compiler options under which XLA computes the float32 operations as written.
AS_WRITTEN = {"xla_disable_hlo_passes": "algsimp"}


def _storages(kernel: str, block_size: int = 16, min_size: int = 0) -> dict[str, Any]:
    return {
        "mu_dtype": BlockwiseQuantized(block_size, min_size, signed=True, kernel=kernel),
        "nu_dtype": BlockwiseQuantized(block_size, min_size, signed=False, kernel=kernel),
    }


OPTIMIZERS = {
    "adamw": lambda kernel: adam_jax.adamw(
        1e-2,
        weight_decay=0.1,
        mask={"ragged": True, "columns": False, "rows": True},
        **_storages(kernel),
    ),  # fmt: skip
    "nesterov_eps_root": lambda kernel: adam_jax.adam(
        1e-2, eps_root=1e-12, nesterov=True, **_storages(kernel)
    ),
    # No bias correction in the rule, and eps = 0: the division that takes 0 / 0 as 0.
    "keras_eps_zero": lambda kernel: adam_jax.adam(
        1e-2, eps=0.0, eps_placement="keras", **_storages(kernel)
    ),
    # b1 an array in the state (its step scalars are arrays the kernel takes as inputs).
    "injected_b1": lambda kernel: optax.inject_hyperparams(
        adam_jax.adam, static_args=("eps", "eps_root", "mu_dtype", "nu_dtype")
    )(optax.linear_schedule(1e-2, 1e-3, 10), b1=0.8, **_storages(kernel)),
}


def _params() -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "ragged": jax.random.normal(keys[0], (325,)),  # 21 blocks of 16, the last of 5
        "columns": jax.random.normal(keys[1], (8, 64)),  # 4 blocks of 16 in each row
        "rows": jax.random.normal(keys[2], (3, 4, 8)),  # blocks of two rows of 8
    }


def _run(
    tx: optax.GradientTransformation, params: Any, options: Any = AS_WRITTEN
) -> tuple[Any, Any, Any]:
    """``STEPS`` calls of one jitted step, on gradients of decreasing size (with a block of
    zeros): the params, state and updates after the last."""

    @functools.partial(jax.jit, compiler_options=options)
    def step(p: Any, s: Any, g: Any) -> tuple[Any, Any, Any]:
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, u

    p, s = params, tx.init(params)
    for i in range(STEPS):
        keys = jax.random.split(jax.random.key(i + 1), len(p))
        g = {
            name: 10.0 ** (-2 * i) * jax.random.normal(k, p[name].shape)
            for name, k in zip(p, keys, strict=True)
        }
        g["ragged"] = g["ragged"].at[:16].set(0.0)
        p, s, u = step(p, s, g)
    return p, s, u


def _pallas_calls(tx: optax.GradientTransformation, params: Any) -> int:
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p))(params, state, params)
    return str(jaxpr).count("pallas_call")


def _assert_identical(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_kernel_is_bit_for_bit_the_xla_path(name: str) -> None:
    params = _params()
    fused = OPTIMIZERS[name]("interpret")
    assert _pallas_calls(fused, params) == len(params)
    _assert_identical(_run(fused, params), _run(OPTIMIZERS[name]("xla"), params))


def test_leaves_the_kernel_does_not_cover_keep_the_xla_path() -> None:
    params = {
        "uneven": jnp.linspace(-1.0, 1.0, 1000),  # blocks of 250: not a power of two
        "ragged_rows": jnp.linspace(-1.0, 1.0, 2 * 700).reshape(2, 700),  # 234 + 234 + 232
        "small": jnp.ones(3),  # float32 moments (min_size)
        "bf16": jnp.ones(64, jnp.bfloat16),  # a bfloat16 gradient
    }

    def tx(kernel: str) -> optax.GradientTransformation:
        return adam_jax.adam(1e-2, **_storages(kernel, 256, min_size=8))

    # Blocks of a whole row of 16384, longer than a program holds (fused.MAX_BLOCK).
    long_rows = adam_jax.adam(1e-2, **_storages("interpret", 16384))
    assert _pallas_calls(long_rows, jnp.ones((2, 16384))) == 0

    assert _pallas_calls(tx("interpret"), params) == 0
    g = jax.tree.map(lambda x: jnp.cos(x * 3.0).astype(x.dtype), params)
    results = [
        jax.jit(t.update, compiler_options=AS_WRITTEN)(g, t.init(params))
        for t in (tx("interpret"), tx("xla"))
    ]
    _assert_identical(*results)


def test_flat_params_take_the_kernel() -> None:
    params = _params()
    flat = adam_jax.flat.flatten(params)
    grads = flat.layout.flatten(jax.tree.map(jnp.sin, params))
    results = []
    for kernel in ("interpret", "xla"):
        tx = adam_jax.adam(1e-2, **_storages(kernel))
        assert _pallas_calls(tx, flat) == (1 if kernel == "interpret" else 0)
        results.append(jax.jit(tx.update, compiler_options=AS_WRITTEN)(grads, tx.init(flat), flat))
    _assert_identical(*results)


def test_slices_take_the_kernel() -> None:
    """``step_in_slices``: the kernel steps each slice of 16 rows, in the loop over them."""
    params = {"w": jnp.cos(jnp.arange(64 * 64.0)).reshape(64, 64)}
    results = []
    for kernel in ("interpret", "xla"):
        tx = adam_jax.step_in_slices(adam_jax.adam(1e-2, **_storages(kernel)), 16 * 64)
        state = tx.init(params)
        jaxpr = str(jax.make_jaxpr(tx.update)(params, state, params))
        assert "scan" in jaxpr and jaxpr.count("pallas_call") == (kernel == "interpret")
        step = jax.jit(tx.update, compiler_options=AS_WRITTEN)
        updates, state = step(params, state, params)
        results.append(step(jax.tree.map(jnp.sin, params), state, params))
    _assert_identical(*results)


def test_offloaded_state_takes_the_kernel() -> None:
    params = _params()
    results = []
    for kernel in ("interpret", "xla"):
        tx = adam_jax.offload_state(adam_jax.adam(1e-2, **_storages(kernel)))
        state = tx.init(params)
        assert _pallas_calls(tx, params) == (len(params) if kernel == "interpret" else 0)
        step = jax.jit(tx.update, compiler_options=AS_WRITTEN)
        _, state = step(params, state, params)
        results.append(step(jax.tree.map(jnp.sin, params), state, params))
    _assert_identical(*results)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_sharded_leaves_keep_the_xla_path(axis_type: AxisType) -> None:
    """A leaf sharded on an Explicit mesh, or any step under a mesh of several devices: the
    kernel is one custom call, which the partitioner would not split."""
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices")
    mesh = jax.make_mesh((2,), ("data",), axis_types=(axis_type,))
    tx = adam_jax.adam(1e-2, **_storages("interpret"))
    with jax.set_mesh(mesh):
        params = jax.device_put(_params(), NamedSharding(mesh, P()))
        params["columns"] = jax.device_put(params["columns"], NamedSharding(mesh, P("data")))
        assert _pallas_calls(tx, params) == 0


def test_forcing_the_kernel_off_a_gpu_fails_in_one_line() -> None:
    tx = adam_jax.adam(1e-2, **_storages("pallas"))
    params = _params()
    if jax.default_backend() == "gpu":
        pytest.skip("the kernel runs here")
    with pytest.raises(ValueError, match=r"^BlockwiseQuantized\(kernel='pallas'\) runs on a CUDA"):
        tx.update(params, tx.init(params))


def test_forcing_the_kernel_on_a_leaf_it_does_not_cover_fails() -> None:
    tx = adam_jax.adam(1e-2, **_storages("pallas", 256))
    params = jnp.ones(1000)  # blocks of 250
    with pytest.raises(ValueError, match="250 elements, not a power of two"):
        tx.update(params, tx.init(params))


def test_kernel_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="kernel must be one of"):
        BlockwiseQuantized(kernel="triton")


def test_auto_takes_the_kernel_for_cuda_only() -> None:
    """``kernel="auto"``: the XLA path on CPU (the same program as ``"xla"``), and the
    kernel's Triton call in the step exported for CUDA (from this CPU)."""
    params = _params()
    tx = adam_jax.adam(1e-2, **_storages("auto"))
    state = tx.init(params)

    def step(g: Any, s: Any, p: Any) -> Any:
        return tx.update(g, s, p)

    triton = "__gpu$xla.gpu.triton"
    exported = jax.export.export(
        jax.jit(step),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)],
    )(params, state, params)
    assert exported.mlir_module().count(f"@{triton}") == len(params)
    on_cpu = jax.jit(step).lower(params, state, params).as_text()
    assert triton not in on_cpu
    xla = adam_jax.adam(1e-2, **_storages("xla"))
    expected = jax.jit(lambda g, s, p: xla.update(g, s, p))(params, state, params)
    _assert_identical(jax.jit(step)(params, state, params), expected)


def test_with_xla_rewrites_codes_differ_by_at_most_one_step() -> None:
    """Compiled as usual (the algebraic simplifier on): a gradient for which XLA:CPU rewrites
    the two programs' divisions differently. The updates differ by two ulps at most (a
    reciprocal rounded, then a product), the codes by one step at most (the nearest entry of a
    moment over a scale divided one way or the other)."""
    params = {"x": jnp.sin(jnp.arange(933.0))}
    tx = {k: adam_jax.scale_by_adam(**_storages(k)) for k in ("interpret", "xla")}
    fused, xla = (jax.jit(tx[k].update)(params, tx[k].init(params)) for k in tx)
    np.testing.assert_array_max_ulp(fused[0]["x"], xla[0]["x"], maxulp=2)
    assert not np.array_equal(fused[0]["x"], xla[0]["x"])  # else the test shows nothing
    moments = [jax.tree.leaves((state.mu, state.nu)) for _, state in (fused, xla)]
    for a, b in zip(*moments, strict=True):
        difference = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        assert difference.max() <= (1 if a.dtype == jnp.uint8 else 0)
