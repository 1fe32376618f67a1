"""The edges where optax users put adam_jax: each test failed on the 0.1 core.

Plain-class moment storages, no compilation per distinct hyperparameter value, no leaked
schedules, optax's state types, Nesterov without bias correction, ``flat`` inside a chain that
passes extra arguments, a constant zero weight decay, decays of exactly 1, the WSD schedule
without a decay phase, ``optax.tree_map_params`` over 8-bit moments, and keyword-only 8-bit
aliases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import weakref
from collections.abc import Iterator

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax
from adam_jax import flat, quantization


def _params() -> dict:
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((64, 80)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal((80,)), jnp.float32),
    }


def _grads(seed: int) -> dict:
    rng = np.random.default_rng(seed + 1)
    return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), _params())


@dataclasses.dataclass
class _Float16Storage(adam_jax.MomentStorage):
    """A user-written storage: a plain, mutable (so unhashable) dataclass."""

    loads: int = 0

    def init(self, param):
        return jnp.zeros(param.shape, jnp.float16)

    def load(self, stored):
        self.loads += 1
        return stored

    def store(self, value, stored):
        return value.astype(stored.dtype)


def test_plain_dataclass_storage_works_eagerly_and_under_jit() -> None:
    storage = _Float16Storage()
    with pytest.raises(TypeError):
        hash(storage)
    tx = adam_jax.adam(1e-2, nu_dtype=storage)
    params = _params()
    state = tx.init(params)
    updates, state = tx.update(_grads(0), state, params)
    updates_jit, state_jit = jax.jit(tx.update)(_grads(1), state, params)
    assert state_jit[0].nu["w"].dtype == jnp.float16
    assert storage.loads > 0
    reference = adam_jax.adam(1e-2, nu_dtype=jnp.float16)
    expected, _ = reference.update(_grads(0), reference.init(params), params)
    chex.assert_trees_all_close(updates, expected, rtol=1e-6)


@contextlib.contextmanager
def _compilations() -> Iterator[list[str]]:
    """Collects the messages of XLA compilations that happen inside the block."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Compiling"):
                messages.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield messages
    finally:
        logger.removeHandler(handler)


def test_new_hyperparameter_values_compile_nothing_in_eager_use() -> None:
    """Eagerly, a transformation rebuilt with other Python floats reuses the compiled ops."""
    params, grads = _params(), _grads(0)

    def one_step(tx: optax.GradientTransformation) -> None:
        _, state = tx.update(grads, tx.init(params), params)
        jax.block_until_ready(state)

    one_step(adam_jax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2))
    with _compilations() as compiled:
        for i in range(3):
            one_step(adam_jax.adamw(1e-3 * (i + 2), b1=0.8 - 0.1 * i, b2=0.99 - 0.01 * i,
                                    eps=1e-7 * (i + 1), weight_decay=1e-3 * (i + 1)))  # fmt: skip
    assert compiled == []


def test_eager_inject_hyperparams_compiles_once_and_takes_new_values() -> None:
    opt = optax.inject_hyperparams(adam_jax.adamw)(learning_rate=1e-2, weight_decay=1e-2)
    params = {"w": jnp.ones((7, 5), jnp.float32), "b": jnp.ones((3,), jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    state = opt.init(params)
    _, state = opt.update(grads, state, params)
    with _compilations() as compiled:
        for step in range(4):
            state.hyperparams["learning_rate"] = jnp.asarray(1e-2 * (step + 2), jnp.float32)
            updates, state = opt.update(grads, state, params)
    assert compiled == []
    assert float(updates["b"][0]) == pytest.approx(-5e-2 * (1 + 1e-2), rel=1e-3)


def test_transformations_do_not_keep_schedules_alive() -> None:
    def make_schedule():
        def decay(count):
            return 1e-2 / (1.0 + count)

        return decay

    params, grads = _params(), _grads(0)
    schedule = make_schedule()
    alive = weakref.ref(schedule)
    tx = adam_jax.adamw(make_schedule(), weight_decay=schedule)
    _, state = tx.update(grads, tx.init(params), params)
    jax.jit(tx.update)(grads, state, params)
    del tx, schedule, state
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: adam_jax.adam(1e-3), lambda: optax.adam(1e-3)),
        (lambda: adam_jax.adamw(1e-3), lambda: optax.adamw(1e-3)),
        (lambda: adam_jax.adamw(1e-3, mask={"w": True, "b": False}),
         lambda: optax.adamw(1e-3, mask={"w": True, "b": False})),
        (lambda: adam_jax.adamw(optax.cosine_decay_schedule(1e-3, 10), weight_decay=lambda c: 1e-4),
         lambda: optax.adamw(optax.cosine_decay_schedule(1e-3, 10), weight_decay=lambda c: 1e-4)),
        (lambda: adam_jax.nadamw(1e-3), lambda: optax.nadamw(1e-3)),
        (lambda: adam_jax.amsgrad(1e-3), lambda: optax.amsgrad(1e-3)),
        (lambda: adam_jax.adamax(1e-3), lambda: optax.adamax(1e-3)),
        (lambda: adam_jax.adamaxw(1e-3), lambda: optax.adamaxw(1e-3)),
    ],
    ids=["adam", "adamw", "adamw_mask", "adamw_schedules", "nadamw", "amsgrad", "adamax",
         "adamaxw"],
)  # fmt: skip
def test_states_are_optax_states(ours, theirs) -> None:
    """Same pytree structure and node types as optax's alias, before and after an update."""
    params, grads = _params(), _grads(0)
    state, optax_state = ours().init(params), theirs().init(params)
    assert jax.tree.structure(state) == jax.tree.structure(optax_state)
    _, state = ours().update(grads, state, params)
    assert jax.tree.structure(state) == jax.tree.structure(optax_state)
    moments = optax.tree.get_all_with_path(state, "mu")
    assert moments, "no first moment found by optax.tree.get_all_with_path"


def test_moment_states_are_optax_types() -> None:
    params = _params()
    assert isinstance(adam_jax.scale_by_adam().init(params), optax.ScaleByAdamState)
    assert isinstance(adam_jax.scale_by_adamax().init(params), optax.ScaleByAdamState)
    assert isinstance(adam_jax.scale_by_amsgrad().init(params), optax.ScaleByAmsgradState)
    assert isinstance(adam_jax.add_decayed_weights(1e-2).init(params), optax.EmptyState)


def test_nesterov_without_bias_correction_is_applied() -> None:
    """m_hat = b1 m + (1 - b1) g: at step 1 (m = (1 - b1) g) that is (1 - b1^2) g."""
    b1 = 0.5
    tx = adam_jax.scale_by_adam(b1=b1, b2=0.0, eps=0.0, nesterov=True, bias_correction=False)
    g = jnp.asarray([2.0, -3.0])
    updates, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(updates, (1 - b1**2) * np.sign(g), rtol=1e-6)


@pytest.mark.parametrize("inner", ["piece", "alias"])
def test_flat_inside_a_chain_with_extra_args(inner: str) -> None:
    transformation = adam_jax.scale_by_adam() if inner == "piece" else adam_jax.adam(1e-2)
    tx = optax.chain(optax.clip_by_global_norm(1.0), flat.flat(transformation))
    params, grads = _params(), _grads(0)
    updates, _ = tx.update(grads, tx.init(params), params, value=jnp.asarray(1.0))
    reference = optax.chain(optax.clip_by_global_norm(1.0), transformation)
    expected, _ = reference.update(grads, reference.init(params), params)
    chex.assert_trees_all_close(updates, expected, rtol=1e-6)


def test_constant_zero_weight_decay_needs_no_params() -> None:
    params, grads = _params(), _grads(0)
    decay = adam_jax.add_decayed_weights(0.0)
    updates, _ = decay.update(grads, decay.init(params))
    chex.assert_trees_all_equal(updates, grads)
    tx = adam_jax.adam_l2(1e-2)  # weight_decay defaults to 0
    updates, _ = tx.update(grads, tx.init(params))
    expected, _ = adam_jax.adam(1e-2).update(grads, adam_jax.adam(1e-2).init(params))
    chex.assert_trees_all_equal(updates, expected)
    with pytest.raises(ValueError, match="needs params"):
        adam_jax.add_decayed_weights(1e-2).update(grads, decay.init(params))


@pytest.mark.parametrize("value", [1.0, np.float32(1.0), np.float64(1.0), jnp.float32(1.0)])
@pytest.mark.parametrize("name", ["b1", "b2"])
def test_decay_of_one_is_rejected_unless_rounded(name: str, value) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1\)"):
        adam_jax.adam(1e-3, **{name: value})
    with pytest.raises(ValueError, match=name):
        adam_jax.scale_by_bias_correction(**{name: value})


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_decay_rounded_to_one_in_low_precision_is_the_running_mean(dtype) -> None:
    b2 = jnp.asarray(0.9999, dtype)
    assert float(b2) == 1.0
    tx = adam_jax.scale_by_adam(b1=0.0, b2=b2, eps=0.0)
    state = tx.init(jnp.zeros(1, dtype))
    for g in (3.0, 1.0):
        updates, state = tx.update(jnp.asarray([g], dtype), state)
    # v_hat is the running mean of g^2: (9 + 1) / 2.
    np.testing.assert_allclose(np.asarray(updates, np.float32), [1.0 / np.sqrt(5.0)], rtol=1e-2)


def test_traced_decay_of_one_is_accepted() -> None:
    def first_update(b2):
        tx = adam_jax.scale_by_adam(b2=b2)
        return tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))[0]

    np.testing.assert_allclose(jax.jit(first_update)(jnp.float32(1.0)), [1.0, 1.0], rtol=1e-6)


def test_wsd_without_decay_phase_ends_at_the_end_value() -> None:
    schedule = adam_jax.warmup_stable_decay_schedule(
        1.0, warmup_steps=2, stable_steps=3, decay_steps=0, end_value=0.25
    )
    values = [float(schedule(t)) for t in range(8)]
    assert values == [0.0, 0.5, 1.0, 1.0, 1.0, 0.25, 0.25, 0.25]


def _eight_bit_adamw() -> optax.GradientTransformation:
    return adam_jax.adamw_8bit(1e-2, weight_decay=1e-2)


def test_tree_map_params_over_a_masked_adamw() -> None:
    params = _params()
    tx = adam_jax.adamw(1e-2, mask={"w": True, "b": False})
    _, state = tx.update(_grads(0), tx.init(params), params)
    doubled = optax.tree_map_params(tx, lambda x: 2 * x, state)
    chex.assert_trees_all_close(doubled[0].mu, jax.tree.map(lambda x: 2 * x, state[0].mu))
    assert doubled[0].count == state[0].count


def test_tree_map_params_identity_over_8bit_state() -> None:
    params = _params()
    tx = _eight_bit_adamw()
    _, state = tx.update(_grads(0), tx.init(params), params)
    mapped = optax.tree_map_params(tx, lambda x: x, state)
    chex.assert_trees_all_equal(mapped, state)


def test_tree_map_params_cast_over_8bit_state_decodes_consistently() -> None:
    """A cast of every params-like leaf (codes and scales included) keeps the moments' values
    (the codes are small integers, exact in bfloat16; the scales round), and update accepts the
    mapped state and writes it back in the 8-bit form (uint8 codes, float32 scales)."""
    params = _params()
    tx = _eight_bit_adamw()
    _, state = tx.update(_grads(0), tx.init(params), params)
    mapped = optax.tree_map_params(tx, lambda x: x.astype(jnp.bfloat16), state)
    quantized, mapped_quantized = state[0].mu["w"], mapped[0].mu["w"]
    assert isinstance(quantized, quantization.QuantizedArray)
    assert mapped_quantized.codes.dtype == jnp.bfloat16
    storage = quantization.BlockwiseQuantized(signed=True)
    np.testing.assert_allclose(
        storage.load(mapped_quantized), storage.load(quantized), rtol=2**-8, atol=0
    )
    updates, after = tx.update(_grads(1), mapped, params)
    dtypes = {"mu": after[0].mu, "nu": after[0].nu}
    assert jax.tree.map(lambda x: x.dtype, dtypes) == {
        name: {
            "b": jnp.dtype(jnp.bfloat16),  # a plain moment keeps the dtype it was cast to
            "w": quantization.QuantizedArray(jnp.dtype(jnp.uint8), jnp.dtype(jnp.float32)),
        }
        for name in ("mu", "nu")
    }
    # The same state with only the scales rounded through bfloat16 gives the very same updates.
    rounded = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16).astype(x.dtype) if x.dtype == jnp.float32 else x, state
    )
    expected, _ = tx.update(_grads(1), rounded, params)
    chex.assert_trees_all_equal(updates, expected)


def test_8bit_state_shardings_from_param_shardings() -> None:
    """The documented recipe: moment_sharding through tree_map_params gives a sharding for every
    state leaf, usable as out_shardings of a jitted init."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 host devices (XLA_FLAGS set in conftest before jax import)")
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding
    param_shardings = {
        "w": sharding(mesh, jax.sharding.PartitionSpec("x")),
        "b": sharding(mesh, jax.sharding.PartitionSpec()),
    }
    params = jax.device_put(_params(), param_shardings)
    tx = _eight_bit_adamw()
    replicated = sharding(mesh, jax.sharding.PartitionSpec())
    state_shardings = optax.tree_map_params(
        tx,
        quantization.moment_sharding,
        jax.eval_shape(tx.init, params),
        param_shardings,
        is_leaf=quantization.is_quantized,
        transform_non_params=lambda _: replicated,
    )
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    codes = state[0].mu["w"].codes
    assert codes.sharding.is_equivalent_to(param_shardings["w"], codes.ndim)
    assert codes.addressable_shards[0].data.shape == (8, 80)
    updates, state = jax.jit(tx.update, out_shardings=(None, state_shardings))(
        _grads(0), state, params
    )
    assert state[0].nu["w"].codes.sharding.is_equivalent_to(param_shardings["w"], 2)


def test_8bit_aliases_are_keyword_only_after_the_learning_rate() -> None:
    with pytest.raises(TypeError):
        adam_jax.adam_8bit(1e-3, 0.9)  # type: ignore[misc]
    params = {"w": jnp.ones((64, 128))}
    ours = adam_jax.adam_8bit(1e-3, b1=0.8, b2=0.99, eps=1e-6, eps_root=0.0)
    reference = adam_jax.adam(1e-3, b1=0.8, b2=0.99, eps=1e-6, **adam_jax.eight_bit_moments())
    grads = jax.tree.map(jnp.ones_like, params)
    chex.assert_trees_all_equal(
        ours.update(grads, ours.init(params))[0],
        reference.update(grads, reference.init(params))[0],
    )
    adamw = adam_jax.adamw_8bit(1e-3, weight_decay=0.1, mask={"w": False})
    updates, _ = adamw.update(grads, adamw.init(params), params)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -1e-3 * g, grads), rtol=1e-5)
