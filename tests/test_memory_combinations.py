"""The memory settings users combine (issue 23), each through the paths they train with:

* 4-bit moments, Adam-mini, factored second moments, and their combinations with bfloat16
  params and stochastic rounding (the settings under 3 bytes per parameter);
* ``flax.nnx.Optimizer``, eagerly and as a ``lax.scan`` carry: the loss decreases and the
  stored forms keep their dtypes and shapes;
* an orbax checkpoint round trip: the restored state continues bit for bit;
* ZeRO-1 on 8 host devices: the sharded state gives the single-device update, and the
  jitted step lowers for the cuda and tpu platforms (accelerator breaks caught on the CPU).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adam_jax
from adam_jax import quantization

MIN_SIZE = 64  # small test leaves are stored as they would be at scale
FOUR_BIT = quantization.four_bit_moments(min_size=MIN_SIZE)
FACTORED = adam_jax.factored_second_moment(16)


def _sr(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    return adam_jax.stochastic_rounding(tx, key=0)


#: name -> (params dtype, optimizer)
SETTINGS: dict[str, tuple[Any, Callable[[], optax.GradientTransformation]]] = {
    "4bit": (jnp.float32, lambda: adam_jax.adamw(1e-2, weight_decay=0.1, **FOUR_BIT)),
    "adam_mini": (jnp.float32, lambda: adam_jax.adam_mini(1e-2, weight_decay=0.1)),
    "factored": (jnp.float32, lambda: adam_jax.adamw(1e-2, nu_dtype=FACTORED)),
    "bf16_sr_4bit_mu_adam_mini": (
        jnp.bfloat16,
        lambda: _sr(adam_jax.adam_mini(1e-2, mu_dtype=FOUR_BIT["mu_dtype"])),
    ),
    "bf16_sr_4bit_mu_factored": (
        jnp.bfloat16,
        lambda: _sr(adam_jax.adamw(1e-2, mu_dtype=FOUR_BIT["mu_dtype"], nu_dtype=FACTORED)),
    ),
}


# Every setting goes through ZeRO-1 against one device (where their layouts differ); the
# containers and the export run the settings whose stored forms differ from one another.
CONTAINED = ("4bit", "bf16_sr_4bit_mu_adam_mini", "bf16_sr_4bit_mu_factored")


def _params(dtype: Any) -> dict[str, Any]:
    """A Dense layer's params under Flax's names (Adam-mini's partition reads them)."""
    kernel = jnp.linspace(-1.0, 1.0, 64 * 96).reshape(64, 96)
    return {"dense": {"kernel": kernel.astype(dtype), "bias": jnp.zeros(96, dtype)}}


def _grads(params: Any, step: int) -> Any:
    return jax.tree.map(
        lambda p: jnp.cos(3.0 * p.astype(jnp.float32) + step).astype(p.dtype), params
    )


def _leaves_equal(a: Any, b: Any) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


@pytest.mark.parametrize("name", CONTAINED)
def test_in_flax_nnx_optimizer(name: str) -> None:
    from flax import nnx

    dtype, make = SETTINGS[name]
    model = nnx.Linear(64, 96, rngs=nnx.Rngs(0), param_dtype=dtype)
    optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (32, 64))
    y = jnp.tile(x, (1, 2))[:, :96]

    def loss_fn(m: nnx.Linear) -> jax.Array:
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def step(m: nnx.Linear, opt: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    def layout() -> list[tuple[Any, str]]:
        # nnx.Optimizer hands the stored forms to the update as mappings of their fields, so
        # the paths change at the first step; the arrays keep their shapes and dtypes.
        return sorted((v.shape, str(v.dtype)) for v in jax.tree.leaves(nnx.state(optimizer)))

    before = layout()
    eager = [float(step(model, optimizer)) for _ in range(4)]
    assert eager[3] < eager[0]
    assert layout() == before
    assert model.kernel.get_value().dtype == dtype

    graphdef, state = nnx.split((model, optimizer))

    def body(carry: nnx.State, _: None) -> tuple[nnx.State, jax.Array]:
        m, opt = nnx.merge(graphdef, carry)
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return nnx.state((m, opt)), loss

    _, scanned = jax.lax.scan(body, state, None, length=4)
    assert scanned[3] < eager[0]


@pytest.mark.parametrize("name", CONTAINED)
def test_orbax_round_trip_continues_bit_for_bit(name: str, tmp_path: Path) -> None:
    import orbax.checkpoint as ocp

    dtype, make = SETTINGS[name]
    tx = make()
    params = _params(dtype)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(2):
        updates, state = update(_grads(params, step), state, params)
        params = optax.apply_updates(params, updates)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "state", jax.eval_shape(lambda: state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert _leaves_equal(restored, state)
    a = update(_grads(params, 2), state, params)
    b = update(_grads(params, 2), restored, params)
    assert _leaves_equal(a, b)


def _zero1(tx: optax.GradientTransformation, params: Any) -> tuple[Any, Any, Any]:
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    replicated = NamedSharding(mesh, P())
    shardings = adam_jax.sharding.state_shardings(tx, params, mesh)
    return mesh, replicated, shardings


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_zero1_on_eight_devices_matches_one_device(name: str) -> None:
    if jax.device_count() < 8:
        pytest.skip("needs 8 host devices (XLA_FLAGS set in conftest before jax import)")
    dtype, make = SETTINGS[name]
    tx = make()
    params = _params(dtype)
    mesh, replicated, shardings = _zero1(tx, params)
    with jax.set_mesh(mesh):
        placed = jax.device_put(params, replicated)
        state = jax.jit(tx.init, out_shardings=shardings)(placed)
        step = jax.jit(tx.update, out_shardings=(replicated, shardings))
        sharded = []
        for i in range(3):
            updates, state = step(jax.device_put(_grads(params, i), replicated), state, placed)
            placed = optax.apply_updates(placed, updates)
            sharded.append(placed)
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    single, single_state = params, tx.init(params)
    update = jax.jit(tx.update)
    for i in range(3):
        updates, single_state = update(_grads(params, i), single_state, single)
        single = optax.apply_updates(single, updates)
        for got, want in zip(jax.tree.leaves(sharded[i]), jax.tree.leaves(single), strict=True):
            got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
            if dtype == jnp.float32:
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
            elif i == 0:
                # The sharded program's float32 sum of param and update may differ from the
                # unsharded one's in its last bit (other fusions), which can turn a stochastic
                # rounding to a neighbouring bfloat16 (as in test_low_precision): bit for bit
                # in all but a few elements, those within a bfloat16 ulp of the largest param.
                # Later steps follow other params and are only checked to stay finite.
                assert np.max(np.abs(got - want)) <= 2**-7 * np.max(np.abs(want))
                assert np.mean(got == want) > 0.98
            else:
                assert np.all(np.isfinite(got))


@pytest.mark.parametrize("name", CONTAINED)
def test_zero1_step_exports_for_cuda_and_tpu(name: str) -> None:
    if importlib.util.find_spec("flatbuffers") is None:
        pytest.skip("jax.export serialization needs flatbuffers")
    if jax.device_count() < 8:
        pytest.skip("needs 8 host devices (XLA_FLAGS set in conftest before jax import)")
    dtype, make = SETTINGS[name]
    tx = make()
    params = _params(dtype)
    mesh, replicated, shardings = _zero1(tx, params)
    abstract = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=replicated), params
    )
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(tx.init, params),
        shardings,
    )

    def train_step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(replicated, shardings))
    with jax.set_mesh(mesh):
        exported = jax.export.export(step, platforms=("cuda", "tpu"))(abstract, state, abstract)
    assert exported.platforms == ("cuda", "tpu")
    assert "stablehlo" in exported.mlir_module()
