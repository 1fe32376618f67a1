"""Adam-mini (``adam_jax.adam_mini``) against the authors' package and its partition rules.

The authors' ``adam_mini.Adam_mini`` (PyPI ``adam-mini`` 1.1.1) runs on a PyTorch model named
like theirs (embedding, query/key/value/output projections, an MLP with a bias, a norm, the
output layer); adam_jax runs the same model in Flax's layout (kernels transposed) with its
default partition, in float64, on the same gradients. They agree to 1e-8 relative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references.common import import_reference_package

import adam_jax

DIM, HEADS, VOCAB, HIDDEN = 8, 2, 12, 16
# torch name -> (torch shape, the Flax path of the same param)
LAYERS = {
    "embed.weight": ((VOCAB, DIM), ("embed", "embedding")),
    "layers.0.attn.q_proj.weight": ((DIM, DIM), ("layers_0", "attn", "q_proj", "kernel")),
    "layers.0.attn.k_proj.weight": ((DIM, DIM), ("layers_0", "attn", "k_proj", "kernel")),
    "layers.0.attn.v_proj.weight": ((DIM, DIM), ("layers_0", "attn", "v_proj", "kernel")),
    "layers.0.attn.o_proj.weight": ((DIM, DIM), ("layers_0", "attn", "o_proj", "kernel")),
    "layers.0.mlp.up_proj.weight": ((HIDDEN, DIM), ("layers_0", "mlp", "up_proj", "kernel")),
    "layers.0.mlp.up_proj.bias": ((HIDDEN,), ("layers_0", "mlp", "up_proj", "bias")),
    "norm.weight": ((DIM,), ("norm", "scale")),
    "lm_head.weight": ((VOCAB, DIM), ("lm_head", "kernel")),
}


def _torch_value(name: str, shape: tuple[int, ...], step: int | None) -> np.ndarray:
    """A param (``step=None``) or the gradient at ``step``, in the torch layout."""
    seed = sum(map(ord, name)) + (0 if step is None else 1000 * (step + 1))
    return np.random.default_rng(seed).standard_normal(shape)


def _flax(name: str, value: np.ndarray) -> np.ndarray:
    """The torch value in Flax's layout: Dense kernels are (in, out), embeddings as they are."""
    return value.T if name.endswith("weight") and value.ndim == 2 and "embed" not in name else value


def _set(tree: dict, path: tuple[str, ...], value: object) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> object:
    for key in path:
        tree = tree[key]
    return tree


def test_adam_mini_matches_the_authors_package(x64: None) -> None:
    Adam_mini = import_reference_package("adam-mini").Adam_mini  # noqa: N806 (their name)
    torch = import_reference_package("torch")

    lr, wd, steps = 1e-2, 0.1, 40
    torch_params = {
        name: torch.nn.Parameter(torch.tensor(_torch_value(name, shape, None)))
        for name, (shape, _) in LAYERS.items()
    }
    reference = Adam_mini(
        list(torch_params.items()), lr=lr, weight_decay=wd, dim=DIM, n_heads=HEADS, verbose=False
    )
    params: dict = {}
    for name, (shape, path) in LAYERS.items():
        _set(params, path, jnp.asarray(_flax(name, _torch_value(name, shape, None))))
    tx = adam_jax.adam_mini(lr, weight_decay=wd, num_heads=HEADS)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(steps):
        grads: dict = {}
        for name, (shape, path) in LAYERS.items():
            g = _torch_value(name, shape, step)
            torch_params[name].grad = torch.tensor(g)
            _set(grads, path, jnp.asarray(_flax(name, g)))
        reference.step()
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    for name, (_, path) in LAYERS.items():
        expected = _flax(name, torch_params[name].detach().numpy())
        np.testing.assert_allclose(_get(params, path), expected, rtol=1e-8, atol=1e-12)


def test_the_partition_of_flax_layouts() -> None:
    params: dict = {}
    for name, (shape, path) in LAYERS.items():
        _set(params, path, jnp.zeros(_flax(name, np.zeros(shape)).shape))
    _set(params, ("conv", "kernel"), jnp.zeros((3, 3, 4, 6)))
    _set(params, ("mha", "query", "kernel"), jnp.zeros((DIM, HEADS, 4)))
    state = adam_jax.adam_mini(1e-3, num_heads=HEADS).init(params)
    nu = jax.tree.map(jnp.shape, state[0].nu)
    assert _get(nu, ("embed", "embedding")) == (VOCAB, 1)  # per token
    assert _get(nu, ("layers_0", "attn", "q_proj", "kernel")) == (1, HEADS)  # per head
    assert _get(nu, ("mha", "query", "kernel")) == (1, HEADS, 1)  # per head, heads on axis 1
    assert _get(nu, ("layers_0", "attn", "v_proj", "kernel")) == (1, DIM)  # per output neuron
    assert _get(nu, ("layers_0", "mlp", "up_proj", "bias")) == (HIDDEN,)  # per parameter
    assert _get(nu, ("norm", "scale")) == (1,)  # per tensor
    assert _get(nu, ("lm_head", "kernel")) == (1, VOCAB)  # per token
    assert _get(nu, ("conv", "kernel")) == (1, 1, 1, 6)  # per output channel


def test_the_authors_decay_mask_spares_norms_and_biases() -> None:
    params = {
        "norm": {"scale": jnp.ones(4)},
        "dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
    }
    tx = adam_jax.adam_mini(1.0, weight_decay=0.5)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(updates["dense"]["kernel"][0, 0]) == -0.5
    assert float(updates["dense"]["bias"][0]) == 0.0 and float(updates["norm"]["scale"][0]) == 0.0


def test_a_partition_tree_may_stop_at_a_subtree() -> None:
    params = {"a": {"w": jnp.zeros((4, 2)), "v": jnp.zeros(3)}, "b": jnp.zeros((2, 2))}
    tx = adam_jax.adam_mini(1e-3, partition={"a": {"w": (4, 1), "v": None}, "b": (2, 2)})
    nu = jax.tree.map(jnp.shape, tx.init(params)[0].nu)
    assert nu == {"a": {"w": (1, 2), "v": (3,)}, "b": (1, 1)}


def test_bad_partitions_name_the_leaf() -> None:
    params = {"a": {"w": jnp.zeros((4, 2))}, "b": jnp.zeros(3)}
    with pytest.raises(ValueError, match="does not cover the leaf 'b'"):
        adam_jax.adam_mini(1e-3, partition={"a": (4, 1)}).init(params)
    with pytest.raises(ValueError, match=r"leaf 'a/w'.*do not divide"):
        adam_jax.adam_mini(1e-3, partition={"a": {"w": (3, 1)}, "b": None}).init(params)
    merged = {"attn": {"query": {"kernel": jnp.zeros((8, 8))}}}
    with pytest.raises(ValueError, match="'attn/query/kernel'.*pass num_heads"):
        adam_jax.adam_mini(1e-3).init(merged)
    with pytest.raises(ValueError, match="num_heads=3 does not divide"):
        adam_jax.adam_mini(1e-3, num_heads=3).init(merged)
    with pytest.raises(ValueError, match="num_heads must be None or an integer >= 1"):
        adam_jax.adam_mini(1e-3, num_heads=0)


def test_adam_mini_keeps_about_half_of_adams_state() -> None:
    params = {
        "embed": {"embedding": jax.ShapeDtypeStruct((1000, 64), jnp.float32)},
        "mlp": {"kernel": jax.ShapeDtypeStruct((64, 256), jnp.float32)},
    }
    adam = adam_jax.state_bytes(jax.eval_shape(adam_jax.adamw(1e-3).init, params))
    mini = adam_jax.state_bytes(jax.eval_shape(adam_jax.adam_mini(1e-3).init, params))
    size = 1000 * 64 + 64 * 256
    assert adam == 8 * size + 4  # two moments and the step count
    assert mini == 4 * size + 4 * (1000 + 256) + 4
