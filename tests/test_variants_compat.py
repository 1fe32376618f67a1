"""Every variant of the modern Adam family wherever adam_jax's Adam works.

For each row of ``tests/variants.py``: jitted and eager updates agree; ``optax.inject_hyperparams``
gives the plain alias's updates and changes the learning rate without recompiling;
``optax.MultiSteps`` applies the variant to the mean gradient; ``optax.apply_if_finite`` skips a
NaN gradient and keeps the state; ``FlatParams`` give the tree's updates (per-tensor rules
included); bfloat16 and 8-bit moments stay close to float32 ones; float16 and bfloat16 params
train without NaN and keep their dtype; params with Python number leaves initialize; bad
hyperparameters raise a ValueError naming the argument, the value and the range; optax's
namesake has the same state structure, so a state moves between the two mid-run.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from variants import BY_NAME, VARIANTS, Variant

import adam_jax
from adam_jax import flat, quantization

IDS = [variant.name for variant in VARIANTS]
STEPS = 12


def _params(dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((16, 32)), dtype),
        "b": jnp.asarray(rng.standard_normal(8), dtype),
        "s": jnp.asarray(rng.standard_normal(()), dtype),
    }


def _grads(params: Any, step: int) -> Any:
    """A noisy gradient of a quadratic bowl (signs change from step to step)."""
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(
        lambda p: (p - 0.5 + jnp.asarray(rng.standard_normal(p.shape), p.dtype)).astype(p.dtype),
        params,
    )


def _run(tx: optax.GradientTransformation, params: Any, steps: int = STEPS, jit: bool = True):
    """``steps`` updates on the bowl; returns the params and the last state."""
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    for step in range(steps):
        updates, state = update(_grads(params, step), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@functools.cache
def _float32_run(name: str) -> Any:
    """The params of :func:`_run` of the variant's defaults on float32 params: the trajectory
    that the compressed moments and low-precision params follow, computed (and compiled) once
    per variant."""
    return _run(BY_NAME[name].make(), _params())[0]


def _relative_error(actual: Any, expected: Any) -> float:
    errors = [
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64))))
        / max(float(np.max(np.abs(np.asarray(e, np.float64)))), 1e-30)
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    ]
    return max(errors)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_jit_and_eager_agree(variant: Variant) -> None:
    """Eager and jitted runs agree to float32 rounding (XLA fuses multiply-adds under jit)."""
    tx = variant.make(**variant.cases.get("decay_mask", {}))
    eager, _ = _run(tx, _params(), steps=6, jit=False)
    jitted, _ = _run(tx, _params(), steps=6, jit=True)
    assert _relative_error(jitted, eager) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_inject_hyperparams(variant: Variant) -> None:
    """Injected hyperparameters (arrays in the state) give the plain alias's updates, and a new
    learning rate needs no new trace."""
    plain = variant.make(**variant.hyperparams)
    injected = optax.inject_hyperparams(variant.alias, static_args=variant.static_args)(
        **variant.hyperparams
    )
    expected, _ = _run(plain, _params(), steps=5)
    traces = []

    @jax.jit
    def update(grads: Any, state: Any, params: Any) -> Any:
        traces.append(1)
        return injected.update(grads, state, params)

    params, state = _params(), injected.init(_params())
    for step in range(5):
        updates, state = update(_grads(params, step), state, params)
        params = optax.apply_updates(params, updates)
    assert _relative_error(params, expected) < 1e-5
    lr = state.hyperparams["learning_rate"]
    state.hyperparams["learning_rate"] = jnp.asarray(2 * lr, lr.dtype)
    update(_grads(params, 5), state, params)
    assert len(traces) == 1


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_multi_steps(variant: Variant) -> None:
    """MultiSteps(k=3): two zero updates, then the variant's update of the mean gradient."""
    params = _params()
    tx = optax.MultiSteps(variant.make(), every_k_schedule=3)
    # Compiled once: an eager MultiSteps update compiles its lax.cond at every call.
    update = jax.jit(tx.update)
    state = tx.init(params)
    grads = [_grads(params, i) for i in range(3)]
    for g in grads[:2]:
        updates, state = update(g, state, params)
        chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    updates, state = update(grads[2], state, params)
    inner = variant.make()
    mean = jax.tree.map(lambda *g: sum(g) / 3, *grads)
    expected, _ = inner.update(mean, inner.init(params), params)
    assert _relative_error(updates, expected) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_apply_if_finite(variant: Variant) -> None:
    """A NaN gradient is skipped: zero updates, the inner state unchanged; the next finite
    gradient continues as if the NaN step had not happened. Both are compiled, as in training
    (``apply_if_finite`` compiles its inner update inside ``lax.cond``: against an eager run,
    float32 contractions would differ, which is not what this tests)."""
    params = _params()
    tx = optax.apply_if_finite(variant.make(), max_consecutive_errors=3)
    reference = variant.make()
    update, reference_update = jax.jit(tx.update), jax.jit(reference.update)
    state, ref_state = tx.init(params), reference.init(params)
    _, state = update(_grads(params, 0), state, params)
    _, ref_state = reference_update(_grads(params, 0), ref_state, params)
    before = state.inner_state
    bad = _grads(params, 1)
    bad["w"] = bad["w"].at[3, 4].set(jnp.nan)
    updates, state = update(bad, state, params)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(state.inner_state, before)
    updates, _ = update(_grads(params, 2), state, params)
    expected, _ = reference_update(_grads(params, 2), ref_state, params)
    assert _relative_error(updates, expected) < 1e-6


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_flat_params(variant: Variant) -> None:
    """The variant on FlatParams (one buffer per decay label) gives the tree's trajectory:
    per-tensor reductions (clipping, caution, trust ratios) and reduced moments (Adam-mini's
    block means) stay per packed tensor. A rule that needs each param's shape refuses them."""
    options = dict(variant.cases.get("decay_mask", {}))
    tree = _params()
    labels = None
    if "mask" in options:
        labels, options["mask"] = options["mask"], flat.labels
    if not variant.flat_params:
        with pytest.raises(ValueError, match="FlatParams"):
            variant.make(**options).init(flat.layout_of(tree, labels).flatten(tree))
        return
    tx_tree, tx_flat = variant.make(**variant.cases.get("decay_mask", {})), variant.make(**options)
    expected, _ = _run(tx_tree, tree)
    layout = flat.layout_of(tree, labels)
    params = layout.flatten(tree)
    state = tx_flat.init(params)
    update = jax.jit(tx_flat.update)
    for step in range(STEPS):
        grads = layout.flatten(_grads(params.to_tree(), step))
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert _relative_error(params.to_tree(), expected) < 1e-5


def _storage_options(variant: Variant, storage: Any) -> dict[str, Any]:
    """The options that store every moment the variant lets a user store in ``storage``."""
    return {name: storage[name] for name in variant.storage_options}


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("storage", ["bfloat16", "8bit", "4bit"])
def test_compressed_moments(variant: Variant, storage: str) -> None:
    """bfloat16, 8-bit or 4-bit (blocks of 64) moments: a finite trajectory close to
    float32's, the state in the chosen form."""
    if storage == "bfloat16":
        kinds = {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16}
    elif storage == "8bit":
        kinds = quantization.eight_bit_moments(block_size=64, min_size=64)
    else:
        kinds = quantization.four_bit_moments(block_size=64, min_size=64)
    tx = variant.make(**_storage_options(variant, kinds))
    expected = _float32_run(variant.name)
    params, state = _run(tx, _params())
    chex.assert_tree_all_finite(params)
    assert _relative_error(params, expected) < 0.05
    leaves = jax.tree.leaves(state)
    if storage == "bfloat16":
        assert any(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    else:
        codes = (16, 32) if storage == "8bit" else (16, 16)  # 4 bits: two codes per byte
        assert any(leaf.dtype == jnp.uint8 and leaf.shape == codes for leaf in leaves)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_params(variant: Variant, dtype: Any) -> None:
    """float16 and bfloat16 params: no NaN or inf in updates or state, updates and params in
    the params' dtype, and the trajectory follows the float32 one to the dtype's precision."""
    tx = variant.make()
    params, state = _run(tx, _params(dtype))
    chex.assert_tree_all_finite((params, state))
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(params))
    assert _relative_error(params, _float32_run(variant.name)) < 0.05


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_python_number_leaves(variant: Variant) -> None:
    """Params with Python int and float leaves initialize (optax accepts them) and update."""
    tx = variant.make()
    params = {"a": 1.0, "b": 2, "w": jnp.ones(3)}
    state = tx.init(params)
    grads = {"a": 0.5, "b": 1, "w": jnp.full(3, 0.5)}
    updates, _ = tx.update(grads, state, params)
    assert np.shape(updates["w"]) == (3,)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_bad_hyperparameters(variant: Variant) -> None:
    """Out-of-range hyperparameters raise ValueError naming argument, value and range."""
    assert variant.bad
    for argument, value, range_text in variant.bad:
        with pytest.raises(ValueError) as error:
            variant.make(**{argument: value})
        message = str(error.value)
        assert re.search(rf"\b{argument}\b", message), message
        assert repr(value) in message or str(value) in message, message
        assert range_text in message, message
    with pytest.raises(ValueError, match="learning_rate"):
        variant.make(learning_rate=-1.0)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.optax], ids=lambda v: v.name)
def test_state_moves_between_adam_jax_and_optax(variant: Variant) -> None:
    """adam_jax's state has the structure, shapes and dtypes of optax's namesake's, and a run
    that switches library halfway follows the run that stays with optax (same arithmetic)."""
    assert variant.optax is not None
    for case in variant.optax_cases:
        options = variant.cases[case]
        ours, theirs = variant.make(**options), variant.optax(**options)
        params = _params()

        def signature(state: Any) -> Any:
            return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), state)

        assert signature(ours.init(params)) == signature(theirs.init(params)), case
        state = theirs.init(params)
        mixed, straight = params, params
        for step in range(2 * STEPS):
            tx = theirs if step < STEPS else ours
            updates, state = jax.jit(tx.update)(_grads(mixed, step), state, mixed)
            mixed = optax.apply_updates(mixed, updates)
        straight, _ = _run(theirs, params, steps=2 * STEPS)
        assert _relative_error(mixed, straight) < 1e-4, case


# Every variant with every option set, and the core aliases and wrappers they build on.
DONATED = {
    **{
        f"{variant.name}-{case}": (
            lambda variant=variant, case=case: variant.make(**variant.cases[case])
        )
        for variant in VARIANTS
        for case in variant.cases
    },
    **{
        name: (lambda name=name: getattr(adam_jax, name)(1e-2))
        for name in ("adam", "adamw", "adam_l2", "nadam", "nadamw", "amsgrad", "adamax")
    },
    "adamw_8bit": lambda: adam_jax.adamw_8bit(1e-2),
    "kahan_summation": lambda: adam_jax.kahan_summation(adam_jax.adamw(1e-2)),
    "stochastic_rounding": lambda: adam_jax.stochastic_rounding(adam_jax.adamw(1e-2), key=0),
}
# The entries that also take the donating step (each compiles one): every variant's first case
# and the core ones. The buffers that a step donates are init's, which every entry checks.
STEPPED = {
    *(f"{variant.name}-{next(iter(variant.cases))}" for variant in VARIANTS),
    *(name for name in DONATED if "-" not in name),
}


def _buffers(tree: Any) -> list[int]:
    """The device buffer of every non-empty array of ``tree``."""
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree) if x.size]


@pytest.mark.parametrize("name", DONATED)
def test_step_donating_params_and_state(name: str) -> None:
    """A training step that donates its params and state (the usual jitted step) runs on a
    fresh state: no two leaves of ``init``'s state, nor a state leaf and a param, share a
    buffer (XLA refuses to donate one buffer twice)."""
    tx = DONATED[name]()

    def loss(params: Any) -> jax.Array:
        return sum(jnp.sum(jnp.abs(p) ** 2) for p in jax.tree.leaves(params))

    def step(params: Any, state: Any) -> tuple[Any, Any]:
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params = _params()
    state = tx.init(params)
    buffers = _buffers((params, state))
    assert len(set(buffers)) == len(buffers)
    if name not in STEPPED:
        return
    new_params, new_state = jax.jit(step, donate_argnums=(0, 1))(params, state)
    # Every input buffer was taken over by the step, and the outputs are the inputs' kind.
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves((params, state)))
    chex.assert_trees_all_equal_shapes_and_dtypes(
        (new_params, new_state), (_params(), tx.init(_params()))
    )
    chex.assert_tree_all_finite((new_params, new_state))
