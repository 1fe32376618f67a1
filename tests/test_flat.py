"""Tests of the many-leaf flat-buffer path (adam_jax.flat)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adam_jax
from adam_jax import flat


def _params(key=0, n=4):
    keys = jax.random.split(jax.random.key(key), 4 * n)
    tree = {
        "layers": [
            {
                "w": jax.random.normal(keys[4 * i], (3 + i, 5)),
                "b": jax.random.normal(keys[4 * i + 1], (5,)),
                "scale": jax.random.normal(keys[4 * i + 2], ()),
            }
            for i in range(n)
        ],
        "embed": jax.random.normal(keys[-1], (11, 4)).astype(jnp.bfloat16),
        "empty": jnp.zeros((0, 3)),
    }
    return tree


def _decay_mask(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and "embed" not in jax.tree_util.keystr(path), tree
    )


def _assert_trees_equal(a, b, rtol=0.0):
    """Bitwise equality (rtol=0), or equality to float rounding."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        if rtol:
            np.testing.assert_allclose(
                np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=1e-12
            )
        else:
            np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))


# Optimizer results on the flat path equal the tree path to float rounding: the elementwise
# math is the same, but XLA's CPU backend vectorizes loops of different lengths differently
# (FMA contraction, reciprocal refinement), which can change the last bit (1 ulp observed).
# On this machine most cases are bitwise identical; the tests don't rely on it.
_ULP_RTOL = 1e-6


def test_roundtrip_exact_and_layout():
    tree = _params()
    fp = flat.flatten(tree)
    assert isinstance(fp, flat.FlatParams)
    # Groups in order of first appearance in the tree ("embed" sorts before "layers").
    assert [g.key for g in fp.layout.groups] == ["bfloat16", "float32"]
    assert all(b.ndim == 1 for b in fp.buffers)
    n32 = sum(x.size for x in jax.tree.leaves(tree) if x.dtype == jnp.float32)
    assert fp["float32"].shape == (n32,) and fp["bfloat16"].dtype == jnp.bfloat16
    _assert_trees_equal(fp.to_tree(), tree)
    # The layout is static, hashable and equal for equal trees.
    assert fp.layout == flat.layout_of(tree) and hash(fp.layout) == hash(flat.layout_of(tree))
    # Pytree round trip (what jit / optax see): one leaf per group.
    leaves, treedef = jax.tree.flatten(fp)
    assert len(leaves) == 2
    _assert_trees_equal(jax.tree.unflatten(treedef, leaves).to_tree(), tree)
    # Mismatched trees are rejected.
    bad = jax.tree.map(lambda x: x.astype(jnp.float16), tree)
    with pytest.raises(ValueError, match="does not match the layout"):
        fp.layout.flatten(bad)


def test_labels_group_leaves_and_roundtrip():
    tree = _params()
    mask = _decay_mask(tree)
    fp = flat.flatten(tree, labels=mask)
    keys = [g.key for g in fp.layout.groups]
    assert sorted(keys) == sorted(["float32/True", "float32/False", "bfloat16/False"])
    expected_true = sum(
        x.size for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask), strict=True) if m
    )
    assert fp["float32/True"].size == expected_true
    _assert_trees_equal(fp.to_tree(), tree)
    lab = flat.labels(fp)
    assert isinstance(lab, flat.FlatParams)
    assert jax.tree.structure(lab) == jax.tree.structure(fp)
    # Callable labels give the same layout.
    assert flat.flatten(tree, labels=_decay_mask).layout == fp.layout


def test_grad_wrt_flat_params_is_flat_and_equal_to_tree_grad():
    tree = _params()
    fp = flat.flatten(tree)

    def loss(t):
        return sum(
            jnp.sum(jnp.sin(x.astype(jnp.float32)) * (i + 1))
            for i, x in enumerate(jax.tree.leaves(t))
        )

    g_tree = jax.grad(loss)(tree)
    g_flat = jax.jit(jax.grad(lambda f: loss(f.to_tree())))(fp)
    assert isinstance(g_flat, flat.FlatParams) and g_flat.layout == fp.layout
    _assert_trees_equal(g_flat.to_tree(), g_tree)
    # The transpose of the views is a concatenate, not a pad + add per leaf (O(size * leaves)).
    hlo = jax.jit(jax.grad(lambda f: loss(f.to_tree()))).lower(fp).as_text()
    assert "stablehlo.pad" not in hlo and "dynamic_update_slice" not in hlo
    assert "stablehlo.concatenate" in hlo


def _run(opt, params, grads_seq):
    state = opt.init(params)

    @jax.jit
    def step(params, state, g):
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

    for g in grads_seq:
        params, state = step(params, state, g)
    return params, state


def _grads(tree, steps=5):
    return [
        jax.tree.map(
            lambda x, k=k: (jnp.cos(x.astype(jnp.float32) * (k + 1)) + 0.1 * k).astype(x.dtype),
            tree,
        )
        for k in range(steps)
    ]


@pytest.mark.parametrize("name", ["adam", "adamw_masked", "nadamw_masked", "amsgrad"])
def test_flat_params_matches_tree_path(name):
    tree = _params()
    mask = _decay_mask(tree)
    grads = _grads(tree)
    make = {
        "adam": lambda m: adam_jax.adam(1e-2),
        "adamw_masked": lambda m: adam_jax.adamw(1e-2, weight_decay=0.1, mask=m),
        "nadamw_masked": lambda m: adam_jax.nadamw(1e-2, weight_decay=0.1, mask=m),
        "amsgrad": lambda m: adam_jax.amsgrad(1e-2),
    }[name]
    p_tree, _ = _run(make(mask), tree, grads)

    # 1. Params kept flat: the user's loop runs on FlatParams, mask=flat.labels.
    fp = flat.flatten(tree, labels=mask)
    flat_grads = [fp.layout.flatten(g) for g in grads]
    p_flat, state = _run(make(flat.labels), fp, flat_grads)
    assert isinstance(p_flat, flat.FlatParams)
    _assert_trees_equal(p_flat.to_tree(), p_tree, rtol=_ULP_RTOL)
    # The state holds one leaf per buffer, not per parameter.
    assert len(jax.tree.leaves(state)) <= 2 + 4 * len(fp.layout.groups)

    # 2. Tree params, wrapped transformation.
    p_wrapped, wstate = _run(flat.flat(make(flat.labels), labels=mask), tree, grads)
    _assert_trees_equal(p_wrapped, p_tree, rtol=_ULP_RTOL)
    assert isinstance(wstate, flat.FlatState)


def test_flat_with_8bit_moments_matches_tree_path_when_no_leaf_is_quantized():
    from adam_jax import quantization as qz

    tree = _params()
    grads = _grads(tree)
    opt = adam_jax.adam(1e-2, **qz.eight_bit_moments())
    p_tree, _ = _run(opt, tree, grads)
    p_flat, _ = _run(flat.flat(opt), tree, grads)
    _assert_trees_equal(p_flat, p_tree, rtol=_ULP_RTOL)


def test_flat_buffer_quantized_moments_jit_and_donation():
    from adam_jax import quantization as qz

    tree = {f"w{i}": jnp.full((40, 30), 0.5 + i) for i in range(10)}  # 12000 elements flat
    fp = flat.flatten(tree)
    opt = adam_jax.adam(1e-2, **qz.eight_bit_moments())
    state = opt.init(fp)
    assert any(x.dtype == jnp.uint8 for x in jax.tree.leaves(state))

    def step(params, state, g):
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

    step = jax.jit(step, donate_argnums=(0, 1))
    g = jax.tree.map(jnp.ones_like, fp)
    fp, state = step(fp, state, g)
    fp, state = step(fp, state, g)
    # Constant positive gradient: Adam moves every element by -lr per step.
    np.testing.assert_allclose(
        np.asarray(fp["float32"]), np.asarray(flat.flatten(tree)["float32"]) - 2e-2, rtol=1e-5
    )


def test_flat_wrapper_state_is_flat_and_compiles_small():
    tree = {f"p{i}": jnp.ones((17,)) * i for i in range(64)}
    opt = flat.flat(adam_jax.adam(1e-3))
    state = opt.init(tree)
    assert len(jax.tree.leaves(state.inner_state)) == 3  # count, mu, nu over one buffer
    g = jax.tree.map(jnp.ones_like, tree)
    p_tree, _ = _run(adam_jax.adam(1e-3), tree, [g])
    p_flat, _ = _run(opt, tree, [g])
    _assert_trees_equal(p_flat, p_tree, rtol=_ULP_RTOL)
    # With flat params, the update's HLO does not grow with the number of leaves.
    fp = flat.flatten(tree)
    st = adam_jax.adam(1e-3).init(fp)
    hlo = (
        jax.jit(lambda g, s, p: adam_jax.adam(1e-3).update(g, s, p))
        .lower(jax.tree.map(jnp.ones_like, fp), st, fp)
        .as_text()
    )
    hlo_tree = (
        jax.jit(lambda g, s, p: adam_jax.adam(1e-3).update(g, s, p))
        .lower(g, adam_jax.adam(1e-3).init(tree), tree)
        .as_text()
    )
    assert len(hlo) * 10 < len(hlo_tree)


def test_multi_transform_with_string_labels():
    tree = {"enc": jnp.ones((4, 4)), "dec": jnp.ones((3,)), "head": jnp.ones((2, 2))}
    labels = {"enc": "a", "dec": "b", "head": "a"}
    ref = optax.multi_transform({"a": adam_jax.adam(1e-2), "b": optax.sgd(1.0)}, labels)
    fp = flat.flatten(tree, labels=labels)
    opt = optax.multi_transform({"a": adam_jax.adam(1e-2), "b": optax.sgd(1.0)}, flat.labels)
    grads = _grads(tree, 3)
    p_ref, _ = _run(ref, tree, grads)
    p_flat, _ = _run(opt, fp, [fp.layout.flatten(g) for g in grads])
    _assert_trees_equal(p_flat.to_tree(), p_ref, rtol=_ULP_RTOL)


def test_nnx_model_params_in_flat_buffer():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(6, 16, rngs=rngs)
            self.norm = nnx.LayerNorm(16, rngs=rngs)
            self.l2 = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.norm(self.l1(x))))

    model = MLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.key(1), (32, 6))
    y = jax.random.normal(jax.random.key(2), (32, 3))
    mask = jax.tree.map(lambda p: p.ndim >= 2, params)

    def loss_tree(params):
        return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)

    def train(params, opt, loss, steps=20):
        state = opt.init(params)

        @jax.jit
        def step(params, state):
            g = jax.grad(loss)(params)
            u, state = opt.update(g, state, params)
            return optax.apply_updates(params, u), state

        for _ in range(steps):
            params, state = step(params, state)
        return params

    loss0 = float(loss_tree(params))
    ref = train(params, adam_jax.adamw(1e-2, weight_decay=0.1, mask=mask), loss_tree)
    fp = flat.flatten(params, labels=mask)
    out = train(
        fp,
        adam_jax.adamw(1e-2, weight_decay=0.1, mask=flat.labels),
        lambda f: loss_tree(f.to_tree()),
    )
    new_params = out.to_tree()
    # Same math, but XLA may fuse the forward/backward pass differently: float rounding only.
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Put the trained params back into the NNX model.
    nnx.update(model, new_params)
    assert float(jnp.mean((model(x) - y) ** 2)) < 0.9 * loss0
    np.testing.assert_array_equal(
        np.asarray(model.l1.kernel[...]), np.asarray(new_params["l1"]["kernel"][...])
    )
