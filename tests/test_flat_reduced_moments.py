"""Reduced and shape-aware moments on FlatParams: kept per packed tensor, as on the tree.

* A factored second moment (Adafactor's rows and columns), Adam-mini's block means and the
  4-bit moments (rank-1 normalized second moment) give, over jitted steps on
  ``flat.flatten(tree)`` or through ``flat.flat``, the tree's params (float64: to 1e-12;
  float32: to a few ulp) and the tree's state bytes: the reduction happens per tensor.
* A buffer mixing factored matrices with vectors and small matrices keeps the latter whole.
* ``optax.tree_map_params`` and a checkpoint round trip of the per-tensor stored forms work.
* Adam-mini's default decay mask reads the packed tree; a buffer that mixes decayed and spared
  tensors is refused when the decay is not zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax
from adam_jax import flat, quantization

STEPS = 20
LR = 1e-2

# Float32 runs: the flat and tree paths do the same arithmetic on each tensor (the same
# reductions over the same axes), but XLA:CPU vectorizes elementwise loops of other lengths
# differently, which can change the last bit of a step (see test_flat.py); 20 steps of updates
# of size LR then differ by well under 1e-6 relative in params of size about 1.
F32_RTOL = 1e-6


def _model(dtype: Any) -> dict[str, Any]:
    """A small transformer-like params tree with Flax's names (Adam-mini's partition)."""
    shapes = {
        "embed": {"embedding": (12, 8)},
        "attn": {"query": {"kernel": (8, 8)}, "value": {"kernel": (8, 8)}},
        "mlp": {"kernel": (8, 16), "bias": (16,)},
        "norm": {"scale": (8,)},
        "head": {"kernel": (8, 3)},
    }
    return jax.tree.map(
        lambda s: jnp.asarray(np.linspace(-1.0, 1.0, int(np.prod(s))).reshape(s), dtype),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _grads(tree: Any, step: int) -> Any:
    """Deterministic gradients of a quadratic plus a step-dependent wave, leaf by leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten(
        [
            p * (1.0 + 0.1 * i) + jnp.sin(0.7 * jnp.arange(p.size, dtype=p.dtype) + 0.3 * step + i)
            .reshape(p.shape)
            for i, p in enumerate(leaves)
        ]
    )  # fmt: skip


def _run(tx: optax.GradientTransformation, params: Any) -> tuple[Any, Any]:
    """``STEPS`` jitted steps on ``params`` (a tree or FlatParams, whose gradients are the
    tree's packed in its layout)."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(STEPS):
        if isinstance(params, flat.FlatParams):
            grads = params.layout.flatten(_grads(params.to_tree(), step))
        else:
            grads = _grads(params, step)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_close(ours: Any, expected: Any, rtol: float) -> None:
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol)


def _both_precisions(test: Callable[[Any, float], None], dtype: str) -> None:
    if dtype == "float64":
        with jax.enable_x64(True):
            test(jnp.float64, 1e-12)
    else:
        test(jnp.float32, F32_RTOL)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_factored_second_moment_on_flat_params_is_the_trees(dtype: str) -> None:
    """Matrices with two axes >= 8 are factored in the flat buffer as on the tree; vectors and
    the (8, 3) head keep their whole moment; params, state bytes and stored moments agree."""

    def test(dtype: Any, rtol: float) -> None:
        tree = _model(dtype)
        tx = adam_jax.adam(LR, nu_dtype=adam_jax.factored_second_moment(8))
        expected, tree_state = _run(tx, tree)
        params, state = _run(tx, flat.flatten(tree))
        _assert_close(params.to_tree(), expected, rtol)
        assert adam_jax.state_bytes(state) == adam_jax.state_bytes(tree_state)
        # The buffer's moment: one stored form per packed tensor, in the layout's order.
        (nu,) = state[0].nu.buffers
        tree_nu = jax.tree.leaves(tree_state[0].nu, is_leaf=lambda x: hasattr(x, "row"))
        assert len(nu) == len(tree_nu) == params.layout.num_leaves
        kinds = [type(x).__name__ for x in nu]
        assert kinds.count("FactoredMoment") == 4  # embedding, query, value and mlp kernels
        _assert_close(nu, tree_nu, rtol)
        # Through the wrapper, the tree keeps its form and the state is the same.
        wrapped, wrapped_state = _run(flat.flat(tx), tree)
        _assert_close(wrapped, expected, rtol)
        assert adam_jax.state_bytes(wrapped_state) == adam_jax.state_bytes(tree_state)

    _both_precisions(test, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_adam_mini_on_flat_params_is_the_trees(dtype: str) -> None:
    """Adam-mini's partition (by the names of the packed tree) gives one block mean per head,
    neuron and token in the flat buffers; with the authors' decay mask as the buffers' labels,
    the steps are the tree's."""

    def test(dtype: Any, rtol: float) -> None:
        tree = _model(dtype)
        spared = jax.tree_util.tree_map_with_path(
            lambda path, _: not any(n in jax.tree_util.keystr(path) for n in ("norm", "bias")),
            tree,
        )
        expected, tree_state = _run(adam_jax.adam_mini(LR, weight_decay=0.1, num_heads=2), tree)
        fp = flat.flatten(tree, labels=spared)
        for mask in (flat.labels, None):  # None: the default mask, read from the packed tree
            options = {} if mask is None else {"mask": mask}
            tx = adam_jax.adam_mini(LR, weight_decay=0.1, num_heads=2, **options)
            params, state = _run(tx, fp)
            _assert_close(params.to_tree(), expected, rtol)
            assert adam_jax.state_bytes(state) == adam_jax.state_bytes(tree_state)
        # Without decay, one buffer for all: the mask decides nothing.
        tx = adam_jax.adam_mini(LR, num_heads=2)
        expected, tree_state = _run(tx, tree)
        params, state = _run(tx, flat.flatten(tree))
        _assert_close(params.to_tree(), expected, rtol)
        assert adam_jax.state_bytes(state) == adam_jax.state_bytes(tree_state)

    _both_precisions(test, dtype)


def test_adam_mini_refuses_a_buffer_that_mixes_decayed_and_spared_tensors() -> None:
    tx = adam_jax.adam_mini(LR, weight_decay=0.1, num_heads=2)
    with pytest.raises(ValueError, match=r"group the leaves by the mask"):
        tx.init(flat.flatten(_model(jnp.float32)))


def test_four_bit_moments_on_flat_params_are_the_trees() -> None:
    """The rank-1 second moment normalizes each packed matrix by its own rows and columns. The
    first moment keeps its blocks of 128 over the buffer (as before): with the large matrices
    in their own buffer, rows of 128 and offsets that are multiples of 128, these are the
    tree's blocks, and the small tensors' buffer stays float32 as they do on the tree."""
    tree = {
        "a": jnp.linspace(-1.0, 1.0, 64 * 128).reshape(64, 128),
        "b": jnp.linspace(0.5, -1.5, 32 * 128).reshape(32, 128),
        "v": jnp.linspace(-1.0, 1.0, 100),
        "m": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
    }
    big = jax.tree.map(lambda x: x.size >= 4096, tree)
    tx = adam_jax.adamw(LR, weight_decay=0.01, **quantization.four_bit_moments())
    expected, tree_state = _run(tx, tree)
    params, state = _run(tx, flat.flatten(tree, labels=big))
    _assert_close(params.to_tree(), expected, F32_RTOL)
    assert adam_jax.state_bytes(state) == adam_jax.state_bytes(tree_state)
    nu = state[0].nu[f"float32/{True}"]
    assert [type(x).__name__ for x in nu] == ["Rank1QuantizedArray"] * 2

    # One buffer for all: the first moment is quantized over the whole buffer as before, the
    # second moment per tensor, with the tree's bytes.
    _, state = _run(tx, flat.flatten(tree))
    assert adam_jax.state_bytes(state[0].nu) == adam_jax.state_bytes(tree_state[0].nu)
    assert adam_jax.state_bytes(state[0].mu) < adam_jax.state_bytes(tree_state[0].mu)


def test_flat_state_of_other_storages_is_one_array_per_buffer() -> None:
    """Storages that keep every element in order keep the buffer's moment as one array."""
    fp = flat.flatten(_model(jnp.float32))
    state = adam_jax.adam(LR, nu_dtype=jnp.bfloat16).init(fp)
    (nu,) = state[0].nu.buffers
    assert nu.shape == (fp.layout.size,) and nu.dtype == jnp.bfloat16


def test_tree_map_params_and_a_checkpoint_round_trip_on_flat_params() -> None:
    tx = adam_jax.adam(LR, nu_dtype=adam_jax.factored_second_moment(8))
    fp = flat.flatten(_model(jnp.float32))
    grads = fp.layout.flatten(_grads(fp.to_tree(), 0))
    _, state = tx.update(grads, tx.init(fp), fp)
    mapped = optax.tree_map_params(tx, lambda p: p * 0, state)
    assert jax.tree.structure(mapped) == jax.tree.structure(state)
    leaves, treedef = jax.tree.flatten(state)
    restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
    a, _ = tx.update(grads, state, fp)
    b, _ = tx.update(grads, restored, fp)
    np.testing.assert_array_equal(a.buffers[0], b.buffers[0])
