"""adam_jax.gradient_order: the order in which a backward pass computes a loss's gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.tree_util import keystr, tree_flatten_with_path

import adam_jax
from benchmarks.models import transformer_loss, transformer_params


def _names(params, order):
    paths = [keystr(path) for path, _ in tree_flatten_with_path(params)[0]]
    return [paths[i] for i in order]


def test_a_chain_of_layers_gets_its_gradients_last_layer_first():
    def loss(p, x):
        for name in ("first", "second", "third"):
            x = jnp.tanh(x @ p[name])
        return jnp.sum(x)

    params = {"first": jnp.ones((3, 4)), "second": jnp.ones((4, 4)), "third": jnp.ones((4, 2))}
    params["unused"] = jnp.ones(5)
    order = adam_jax.gradient_order(loss, params, jnp.ones((2, 3)))
    # The tree's order is first, second, third, unused; an unused param's zeros come last.
    assert _names(params, order) == ["['third']", "['second']", "['first']", "['unused']"]


def test_a_transformer_gets_the_head_first_and_the_embedding_last():
    """From shapes alone: the head and the final norm, then each block from the last to the
    first (its MLP before its attention), then the position table and the embedding, whose
    gradient the token lookup's transpose makes last."""
    params = jax.eval_shape(lambda: transformer_params(jax.random.key(0), layers=3))
    tokens = jax.ShapeDtypeStruct((2, 17), jnp.int32)
    names = _names(params, adam_jax.gradient_order(transformer_loss, params, tokens))
    assert sorted(names) == sorted(_names(params, range(len(names))))
    assert names[0] == "['head']" and names[-1] == "['embed']"
    firsts = [
        next(i for i, n in enumerate(names) if n.startswith(f"['blocks'][{b}]")) for b in range(3)
    ]
    assert firsts[2] < firsts[1] < firsts[0]
    block = [n for n in names if n.startswith("['blocks'][1]")]
    assert block.index("['blocks'][1]['mlp']['w2']") < block.index("['blocks'][1]['attn']['wq']")


def test_a_jitted_or_rematerialized_loss_is_read_inside_its_call():
    """The gradient of a loss under ``jax.jit`` (or of layers under ``jax.checkpoint``) comes
    out of one equation: the order is read inside the jaxpr it runs."""

    def loss(p, x):
        return jnp.sum(jnp.tanh(jnp.tanh(x @ p["a"]) @ p["b"]))

    def layered(p, x):
        layer = jax.checkpoint(lambda w, h: jnp.tanh(h @ w))
        return jnp.sum(layer(p["b"], layer(p["a"], x)))

    params = {"a": jnp.ones((3, 3)), "b": jnp.ones((3, 3))}
    for f in (jax.jit(loss), jax.jit(jax.jit(loss)), layered):
        assert adam_jax.gradient_order(f, params, jnp.ones((2, 3))) == (1, 0)


def test_layers_in_a_scan_come_before_the_layer_below_them():
    """Stacked layers under ``lax.scan`` get their gradient from the backward loop, before the
    input projection below them (the tree's order is the other way round)."""

    def loss(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x @ p["in"], p["stack"])
        return jnp.sum(h)

    params = {"in": jnp.ones((3, 4)), "stack": jnp.ones((2, 4, 4))}
    assert adam_jax.gradient_order(loss, params, jnp.ones((2, 3))) == (1, 0)


@pytest.mark.parametrize("leaf_order", [(0, 0), (1, 2), (0, 1.5), ("0", "1")])
def test_offload_state_refuses_an_order_that_is_not_a_permutation(leaf_order):
    with pytest.raises(ValueError, match=r"leaf_order must hold each position 0 to n - 1"):
        adam_jax.offload_state(adam_jax.adamw(1e-2), leaf_order=leaf_order)


def test_a_loss_with_auxiliary_data_orders_its_gradients_alone():
    def loss(p, x):
        hidden = jnp.tanh(x @ p["first"])
        return jnp.sum(jnp.tanh(hidden @ p["second"])), {"hidden": hidden, "x": x}

    params = {"first": jnp.ones((3, 3)), "second": jnp.ones((3, 1))}
    order = adam_jax.gradient_order(loss, params, jnp.ones((2, 3)), has_aux=True)
    assert order == (1, 0)


def test_offload_state_refuses_an_order_without_leaf_by_leaf():
    with pytest.raises(ValueError, match=r"give leaf_by_leaf=True \(the default\), or no"):
        adam_jax.offload_state(adam_jax.adamw(1e-2), leaf_by_leaf=False, leaf_order=(0, 1))
