"""What the benchmarks optimize: float32 trees, a transformer-like model, the MNIST CNN."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adam_jax import flat

Loss = Callable[[Any, Any], jax.Array]


def make_tree(num_leaves: int, leaf_size: int, key: int = 0) -> dict[str, jax.Array]:
    """``num_leaves`` float32 vectors of ``leaf_size`` standard normal elements."""
    keys = jax.random.split(jax.random.key(key), num_leaves)
    return {
        f"p{i:04d}": jax.random.normal(k, (leaf_size,), jnp.float32) for i, k in enumerate(keys)
    }


def params_and_grads(num_leaves: int, leaf_size: int) -> tuple[dict[str, jax.Array], Any]:
    """A tree and a gradient of the same structure, scaled like a real one (about 1e-3)."""
    params = make_tree(num_leaves, leaf_size)
    grads = jax.tree.map(lambda g: 1e-3 * g, make_tree(num_leaves, leaf_size, key=1))
    return params, grads


def abstract_tree(num_leaves: int, leaf_shape: tuple[int, ...]) -> dict[str, Any]:
    return {f"p{i:04d}": jax.ShapeDtypeStruct(leaf_shape, jnp.float32) for i in range(num_leaves)}


def abstract_flat_params(tree: Any) -> flat.FlatParams:
    """The ``FlatParams`` that ``flat.flatten(tree)`` would build, without allocating it."""
    layout = flat.layout_of(tree)
    groups = tuple(jax.ShapeDtypeStruct((g.size,), g.dtype) for g in layout.groups)
    return flat.FlatParams(groups, layout)


def transformer_params(
    key: jax.Array, layers: int = 16, d: int = 64, ff: int = 256, vocab: int = 256, seq: int = 32
) -> dict[str, Any]:
    """A transformer-like parameter tree: 12 leaves per block, 16 blocks, ~200 leaves."""
    ks = iter(jax.random.split(key, 8 * layers + 8))

    def dense(fan_in: int, fan_out: int) -> jax.Array:
        return jax.random.normal(next(ks), (fan_in, fan_out)) * (fan_in**-0.5)

    def layer_norm() -> dict[str, jax.Array]:
        return {"scale": jnp.ones(d), "bias": jnp.zeros(d)}

    blocks = [
        {
            "ln1": layer_norm(),
            "attn": {w: dense(d, d) for w in ("wq", "wk", "wv", "wo")},
            "ln2": layer_norm(),
            "mlp": {
                "w1": dense(d, ff),
                "b1": jnp.zeros(ff),
                "w2": dense(ff, d),
                "b2": jnp.zeros(d),
            },
        }
        for _ in range(layers)
    ]
    return {
        "embed": dense(vocab, d),
        "pos": dense(seq, d) * 0.1,
        "blocks": blocks,
        "ln_f": layer_norm(),
        "head": dense(d, vocab),
    }


def transformer_loss(params: dict[str, Any], tokens: jax.Array, heads: int = 4) -> jax.Array:
    """Next-token cross entropy of a pre-norm causal transformer."""

    def ln(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]

    x = params["embed"][tokens[:, :-1]] + params["pos"][: tokens.shape[1] - 1]
    b, t, d = x.shape
    mask = jnp.tril(jnp.ones((t, t), bool))
    for blk in params["blocks"]:
        h = ln(x, blk["ln1"])
        q, k, v = (
            (h @ blk["attn"][w]).reshape(b, t, heads, d // heads) for w in ("wq", "wk", "wv")
        )
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
        x = x + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d) @ blk["attn"]["wo"]
        h = ln(x, blk["ln2"])
        x = (
            x
            + jax.nn.gelu(h @ blk["mlp"]["w1"] + blk["mlp"]["b1"]) @ blk["mlp"]["w2"]
            + blk["mlp"]["b2"]
        )
    logits = ln(x, params["ln_f"]) @ params["head"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def cnn_model() -> tuple[Any, Loss]:
    """The examples' MNIST CNN (``examples.mnist.models.CNN``): its params and loss."""
    from flax import nnx

    from examples.mnist.models import CNN

    graphdef, params = nnx.split(CNN(rngs=nnx.Rngs(0)), nnx.Param)

    def loss(params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, loss


def gpt2_small_shapes() -> dict[str, Any]:
    """GPT-2 small's parameters as Hugging Face's ``GPT2Model`` names and shapes them: token and
    position embeddings, 12 blocks of 12 leaves (fused QKV), the final layer norm; 148 float32
    leaves, 124,439,808 params (the output head is the token embedding, tied)."""
    d, ff, vocab, context = 768, 3072, 50257, 1024

    def array(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    def layer_norm() -> dict[str, Any]:
        return {"scale": array(d), "bias": array(d)}

    block = {
        "ln_1": layer_norm(),
        "attn": {
            "c_attn": {"w": array(d, 3 * d), "b": array(3 * d)},
            "c_proj": {"w": array(d, d), "b": array(d)},
        },
        "ln_2": layer_norm(),
        "mlp": {
            "c_fc": {"w": array(d, ff), "b": array(ff)},
            "c_proj": {"w": array(ff, d), "b": array(d)},
        },
    }
    return {
        "wte": array(vocab, d),
        "wpe": array(context, d),
        "h": [block] * 12,
        "ln_f": layer_norm(),
    }
