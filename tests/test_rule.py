"""The per-tensor helpers of the moment-rule core (``adam_jax.rule``), checked against NumPy:

* ``Leaf.sum`` / ``Leaf.mean`` on a FlatParams buffer are the sums / means of each packed
  tensor, repeated over its elements, and on an ordinary leaf the whole-array ones; ``dtype``
  sets the accumulation (an int8 mask of 300 ones counts to 300, not to int8's wrap-around);
* ``map_tensors`` gives the same per-tensor results on ``FlatParams`` as on the tree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adam_jax
from adam_jax._src.rule import Leaf, tensor_segments


def _tree() -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return {
        "a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
        "c": jnp.asarray(rng.normal(size=(2, 2, 2)), jnp.float32),
    }


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_leaf_reductions_per_packed_tensor(reduction: str) -> None:
    tree = _tree()
    flat = adam_jax.flat.flatten(tree)
    (buffer,), (segments,) = flat.buffers, tensor_segments(flat)
    got = np.asarray(getattr(Leaf(param=None, decay=0.0, segments=segments), reduction)(buffer))
    per_tensor = [getattr(np.asarray(tree[k], np.float64), reduction)() for k in sorted(tree)]
    sizes = [tree[k].size for k in sorted(tree)]
    np.testing.assert_allclose(got, np.repeat(per_tensor, sizes), rtol=1e-6)
    whole = getattr(Leaf(param=None, decay=0.0, segments=None), reduction)(tree["a"])
    assert whole.shape == ()
    np.testing.assert_allclose(
        whole, getattr(np.asarray(tree["a"], np.float64), reduction)(), rtol=1e-6
    )


@pytest.mark.parametrize("segments", [None, (300, 100)])
def test_leaf_sum_accumulates_in_dtype(segments: tuple[int, ...] | None) -> None:
    ones = jnp.ones(400, jnp.int8)
    total = Leaf(param=None, decay=0.0, segments=segments).sum(ones, dtype=jnp.float32)
    assert total.dtype == jnp.float32
    expected = 400.0 if segments is None else np.repeat([300.0, 100.0], [300, 100])
    np.testing.assert_array_equal(total, expected)


def test_map_tensors_same_on_flat_params_as_on_tree() -> None:
    tree = _tree()
    scale = jax.tree.map(lambda x: 2.0 * x + 1.0, tree)

    def normalized(x: jax.Array, y: jax.Array, leaf: Leaf) -> jax.Array:
        return x * y / leaf.sum(jnp.abs(x))

    on_tree = adam_jax.rules.map_tensors(normalized, tree, scale)
    flat = adam_jax.rules.map_tensors(
        normalized, adam_jax.flat.flatten(tree), adam_jax.flat.flatten(scale)
    ).to_tree()
    for key, x in tree.items():
        x64, y64 = np.asarray(x, np.float64), np.asarray(scale[key], np.float64)
        np.testing.assert_allclose(on_tree[key], x64 * y64 / np.abs(x64).sum(), rtol=1e-6)
        np.testing.assert_allclose(flat[key], on_tree[key], rtol=1e-6)


def test_map_tensors_rejects_mismatched_trees() -> None:
    tree = _tree()
    with pytest.raises(ValueError):
        adam_jax.rules.map_tensors(lambda x, y, leaf: x, tree, {"a": tree["a"]})
