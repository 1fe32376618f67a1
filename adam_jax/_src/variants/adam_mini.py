r"""Adam-mini: one second moment per Hessian block instead of one per parameter.

Zhang et al. (2025) observe that the Hessian of a transformer is near block-diagonal, with
blocks per output neuron, per attention head and per token of the embedding, and that one
learning rate per block does as well as Adam's one per parameter. Adam-mini keeps Adam's first
moment and replaces the second by its mean over each block: the optimizer state shrinks by
about half (the second moment is a few values per layer).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from adam_jax import rules
from adam_jax.rules import (
    FlatParams,
    Mask,
    MomentStorage,
    OptimizerInfo,
    Paper,
    add_decayed_weights,
    block_means,
    cast_storage,
    descend,
    per_leaf,
    scale_by_adam,
)

#: Name fragments of the authors' partition (``adam_mini.Adam_mini``), matched against the
#: lowercased path of a leaf, with Flax's names added (``embedding``).
EMBEDDING_NAMES = ("embed", "embd", "wte", "embedding")
QUERY_KEY_NAMES = ("k_proj", "q_proj", "wq", "wk", "query", "key")
NO_DECAY_NAMES = ("norm", "ln", "bias")
# The default mask of adam_mini, by name: a string, which optax.inject_hyperparams keeps
# as it is (a function it would call as a schedule of the step).
DEFAULT_MASK = "by_name"

Partition = Callable[[Any], Any]


def _path_name(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/").lower()


def adam_mini_block_shape(
    name: str, shape: tuple[int, ...], num_heads: int | None = None
) -> tuple[int, ...] | None:
    """The block of one param in the authors' partition, in Flax's layouts, or None for one
    second moment per parameter (biases, as the authors do).

    * a bias (``bias`` in the name): per parameter;
    * another vector or scalar (norm scales): one value for the tensor;
    * an embedding (``embed``, ``wte``, ``embedding``...), ``(vocab, d)``: one per token;
    * a query or key kernel (``query``, ``key``, ``q_proj``...): one per head, the heads on
      axis 1 of a ``(d, heads, head_dim)`` kernel (``nnx.MultiHeadAttention``), or the last
      axis cut in ``num_heads`` for a ``(d, heads * head_dim)`` one;
    * any other kernel (values, attention output, MLP, the output layer, convolutions): one per
      output neuron, the last axis in Flax (``(in, out)``; ``(h, w, in, out)``).

    Raises:
      ValueError: for a 2-D query or key kernel without ``num_heads``, or one whose last axis
        ``num_heads`` does not divide.
    """
    if "bias" in name:
        return None
    if len(shape) <= 1:
        return shape
    if any(part in name for part in EMBEDDING_NAMES) and len(shape) == 2:
        return (1, shape[1])
    if any(part in name for part in QUERY_KEY_NAMES):
        if len(shape) == 3:
            return (shape[0], 1, shape[2])
        if num_heads is None:
            raise ValueError(
                f"adam_mini: the query/key kernel {name!r} of shape {shape} has its heads "
                "merged in the last axis: pass num_heads"
            )
        if shape[-1] % num_heads:
            raise ValueError(
                f"adam_mini: num_heads={num_heads} does not divide the last axis of the "
                f"query/key kernel {name!r} of shape {shape}"
            )
        return (*shape[:-1], shape[-1] // num_heads)
    return (*shape[:-1], 1)


def adam_mini_partition(num_heads: int | None = None) -> Partition:
    """The authors' partition as a function of the params tree: for each leaf, a
    :class:`adam_jax.BlockMeanStorage` of :func:`adam_mini_block_shape` (or plain storage for
    biases). Works on Flax NNX states and linen param dicts, and any tree whose paths name the
    layers.

    Args:
      num_heads: the number of attention heads, needed for query and key kernels whose heads
        are merged in one axis.

    Returns:
      ``params -> tree of storages``, for :func:`adam_mini`'s ``partition``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = {"embedding": jnp.zeros((50, 8)), "mlp": {"kernel": jnp.zeros((8, 16)),
      ...           "bias": jnp.zeros(16)}, "norm": {"scale": jnp.zeros(8)}}
      >>> storages = adam_jax.adam_mini_partition()(params)
      >>> print(storages["embedding"].block_shape, storages["mlp"]["kernel"].block_shape,
      ...       storages["norm"]["scale"].block_shape)
      (1, 8) (8, 1) (8,)
    """

    def partition(params: Any) -> Any:
        def storage(path: tuple[Any, ...], leaf: Any) -> MomentStorage:
            block = adam_mini_block_shape(_path_name(path), tuple(np.shape(leaf)), num_heads)
            return cast_storage() if block is None else block_means(block)

        return jax.tree_util.tree_map_with_path(storage, params)

    return partition


def _as_partition(partition: Partition | Any | None, num_heads: int | None) -> Partition:
    """A partition function from ``None`` (the authors'), a function, or a tree of block
    shapes (tuples; None for one value per parameter) or storages."""
    if partition is None:
        return adam_mini_partition(num_heads)
    if callable(partition):
        return partition
    tree = partition

    def from_tree(params: Any) -> Any:
        def storage(path: tuple[Any, ...], leaf: Any) -> MomentStorage:
            spec = _lookup(tree, path)
            if isinstance(spec, MomentStorage):
                return spec
            if spec is None:
                return cast_storage()
            storage = block_means(spec)
            try:
                storage.stored_shape(tuple(np.shape(leaf)))
            except ValueError as error:
                raise ValueError(
                    f"adam_mini partition, leaf {_path_name(path)!r}: {error}"
                ) from None
            return storage

        return jax.tree_util.tree_map_with_path(storage, params)

    return from_tree


def _is_spec(node: Any) -> bool:
    """A block shape (a tuple of ints), None (per parameter) or a storage."""
    block = isinstance(node, tuple) and all(isinstance(x, int) for x in node)
    return block or node is None or isinstance(node, MomentStorage)


def _lookup(tree: Any, path: tuple[Any, ...]) -> Any:
    """The entry of ``tree`` at ``path`` (a leaf path of the params), where ``tree`` may stop
    early at a block spec that covers the whole subtree; ValueError when it does not cover it."""
    node = tree
    for depth, key in enumerate(path):
        if _is_spec(node):
            return node
        try:
            if isinstance(key, jax.tree_util.GetAttrKey):
                node = getattr(node, key.name)
            else:
                node = node[key.key if isinstance(key, jax.tree_util.DictKey) else key.idx]
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ValueError(
                f"adam_mini partition does not cover the leaf {_path_name(path)!r} (nothing at "
                f"{_path_name(path[: depth + 1])!r})"
            ) from None
    return node


def _no_decay_mask(params: Any, mixed: bool | None = None) -> Any:
    """The authors' decay mask: no decay for norms and biases (by name).

    A buffer of :class:`adam_jax.FlatParams` takes the value of the tensors it packs; for one
    that packs both kinds, ``mixed``, or a ValueError when it is None (the decay would differ
    from the tree's).
    """

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        return not any(part in _path_name(path) for part in NO_DECAY_NAMES)

    def buffer_mask(node: FlatParams) -> FlatParams:
        tensors = node.layout.treedef.flatten_up_to(
            jax.tree_util.tree_map_with_path(decays, node.layout.abstract_tree())
        )
        buffers = []
        for group in range(len(node.layout.groups)):
            kinds = {tensors[i] for i, s in enumerate(node.layout.slots) if s.group == group}
            if len(kinds) > 1 and mixed is None:
                raise ValueError(
                    "adam_mini's default mask spares norms and biases from weight decay, and "
                    "a buffer of these FlatParams packs both them and decayed tensors: group "
                    "the leaves by the mask (flat.flatten(params, labels=mask)) and pass "
                    "mask=flat.labels"
                )
            buffers.append(kinds.pop() if len(kinds) == 1 else mixed)
        return FlatParams(tuple(buffers), node.layout)

    return jax.tree_util.tree_map_with_path(
        lambda path, x: buffer_mask(x) if isinstance(x, FlatParams) else decays(path, x),
        params,
        is_leaf=lambda x: isinstance(x, FlatParams),
    )


def _check_num_heads(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamMiniHyperparams:
    """Adam-mini's hyperparameters: see :func:`scale_by_adam_mini` (Adam's rule, with a
    second moment in block-mean storage: no rule of its own)."""

    b1: Any = rules.b1()
    b2: Any = rules.hyperparam(
        0.999, "decay of the block second moments, in [0, 1).", rules.check_decay
    )
    eps: Any = rules.eps()
    num_heads: int | None = rules.hyperparam(
        None,
        "attention heads, for query and key kernels with merged heads, ``None`` or an integer "
        ">= 1 (see :func:`adam_jax.adam_mini_block_shape`).",
        _check_num_heads,
    )
    partition: Partition | Any | None = rules.hyperparam(
        None,
        "the blocks: ``None`` (the authors' partition by layer names, "
        ":func:`adam_jax.adam_mini_partition`), a function ``params -> tree of storages``, or a "
        "tree like the params of block shapes (a tuple per leaf, ``None`` for one value per "
        "parameter) or storages, which may stop at a subtree.",
    )
    mu_dtype: Any = rules.mu_dtype()

    def __post_init__(self) -> None:
        rules.check_fields(self)


def _scale_by_adam_mini(config: AdamMiniHyperparams) -> optax.GradientTransformation:
    storages = per_leaf(_as_partition(config.partition, config.num_heads))
    return scale_by_adam(config.b1, config.b2, config.eps, 0.0, config.mu_dtype,
                         nu_dtype=storages)  # fmt: skip


def scale_by_adam_mini(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    *,
    num_heads: int | None = None,
    partition: Partition | Any | None = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Rescales gradients by Adam-mini's moment estimates (Zhang et al., 2025, Algorithm 1).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_{t,b} = \beta_2 v_{t-1,b} + (1-\beta_2)\, \operatorname{mean}_{i \in b} g_{t,i}^2, \\
        u_{t,i} = \frac{m_{t,i} / (1-\beta_1^t)}{\sqrt{v_{t,b(i)} / (1-\beta_2^t)} + \epsilon}

    for each block :math:`b` of the partition. This is :func:`adam_jax.scale_by_adam` with its
    second moment in a :class:`adam_jax.BlockMeanStorage` per leaf, so it brings everything
    the core does (sharded params, ZeRO-1, bfloat16 or 8-bit first moments); the state is
    ``optax.ScaleByAdamState`` with ``nu`` holding the block means.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the block second moments, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      num_heads: attention heads, for query and key kernels with merged heads, ``None`` or an
        integer >= 1 (see :func:`adam_jax.adam_mini_block_shape`).
      partition: the blocks: ``None`` (the authors' partition by layer names,
        :func:`adam_jax.adam_mini_partition`), a function ``params -> tree of storages``, or a tree
        like the params of block shapes (a tuple per leaf, ``None`` for one value per parameter) or
        storages, which may stop at a subtree.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAdamState``.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> tx = adam_jax.scale_by_adam_mini()
      >>> params = {"dense": {"kernel": jnp.zeros((3, 2))}}
      >>> grads = {"dense": {"kernel": jnp.array([[1.0, 2.0], [1.0, 2.0], [1.0, 8.0]])}}
      >>> updates, state = tx.update(grads, tx.init(params))
      >>> print(state.nu["dense"]["kernel"])  # (1 - b2) times each column's mean of g^2
      [[0.001 0.024]]
      >>> print(jnp.round(updates["dense"]["kernel"][:, 1], 4))  # g / RMS of its column
      [0.4082 0.4082 1.633 ]
    """
    return _scale_by_adam_mini(
        AdamMiniHyperparams(
            b1=b1,
            b2=b2,
            eps=eps,
            num_heads=num_heads,
            partition=partition,
            mu_dtype=mu_dtype,
        ),
    )


def _adam_mini(
    config: AdamMiniHyperparams,
    *,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    mask: Mask | str | None,
    maximize: bool,
) -> optax.GradientTransformation:
    never_decays = not callable(weight_decay) and rules.static_float(weight_decay) == 0.0
    if isinstance(mask, str):
        rules.check_choice("mask", mask, (DEFAULT_MASK,))
        mask = _no_decay_mask
    if mask is _no_decay_mask and never_decays:
        # A FlatParams buffer that packs biases and kernels then needs no labels of its own.
        mask = functools.partial(_no_decay_mask, mixed=True)
    return descend(
        learning_rate,
        _scale_by_adam_mini(config),
        add_decayed_weights(weight_decay, mask),
        maximize=maximize,
    )


def adam_mini(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Mask | str | None = DEFAULT_MASK,
    *,
    num_heads: int | None = None,
    partition: Partition | Any | None = None,
    mu_dtype: Any = None,
    maximize: bool = False,
) -> optax.GradientTransformation:
    r"""Adam-mini: AdamW with one second moment per Hessian block (Zhang et al., 2025).

    .. math::
        \theta_t = \theta_{t-1} - \alpha(t) \left( u_t + \lambda \theta_{t-1} \right)

    with :math:`u_t` from :func:`adam_jax.scale_by_adam_mini`. The arithmetic, defaults and
    decay are the authors' ``adam_mini.Adam_mini`` (version 1.1.1): decoupled weight decay
    scaled by the learning rate, none for parameters whose name has ``norm``, ``ln`` or
    ``bias`` (the default ``mask``, ``"by_name"``: a string rather than a function, so that
    ``optax.inject_hyperparams(adam_mini)``, which takes every callable argument for a
    schedule of the step, keeps it). Their partition is by PyTorch layer names and layouts;
    :func:`adam_jax.adam_mini_partition` gives the same blocks for Flax's names and layouts
    (kernels ``(in, out)``: one value per output neuron), and also gives convolution kernels
    one value per output channel, where the authors' code keeps one per tensor for layers it
    does not recognize. Their embeddings and output layer keep one value per token, as here.
    On :class:`adam_jax.FlatParams` the partition and the default mask read the tree the
    buffers pack, and the block means are kept per packed tensor; with weight decay, a buffer
    must not mix decayed and spared tensors (flatten with the mask as labels, and pass
    ``mask=flat.labels``).

    Args:
      learning_rate: a constant >= 0 or a schedule of the 0-based step.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the block second moments, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      num_heads: attention heads, for query and key kernels with merged heads, ``None`` or an
        integer >= 1 (see :func:`adam_jax.adam_mini_block_shape`).
      partition: the blocks: ``None`` (the authors' partition by layer names,
        :func:`adam_jax.adam_mini_partition`), a function ``params -> tree of storages``, or a tree
        like the params of block shapes (a tuple per leaf, ``None`` for one value per parameter) or
        storages, which may stop at a subtree.
      mu_dtype: storage of the first moment (``None``: the params' dtype; a dtype; or a
        :class:`adam_jax.MomentStorage`).
      weight_decay: decoupled weight decay :math:`\lambda`, a constant >= 0 or a schedule of the
        step.
      mask: which leaves to decay (a tree of bools or a callable of the params).
      maximize: ascend the objective instead of descending (PyTorch's ``maximize``).

    Returns:
      An ``optax.GradientTransformation`` with optax's ``adamw`` state structure.

    References:
      Zhang, Chen, Li, Ding, Chen, Kingma, Ye, Luo and Sun, `Adam-mini: Use Fewer Learning
      Rates To Gain More <https://arxiv.org/abs/2406.16793>`_, ICLR 2025; the authors' code,
      https://github.com/zyushun/Adam-mini.

    Example:
      >>> import adam_jax, jax.numpy as jnp
      >>> params = {"dense": {"kernel": jnp.ones((256, 64)), "bias": jnp.zeros(64)}}
      >>> tx = adam_jax.adam_mini(1e-3, weight_decay=0.1)
      >>> state = tx.init(params)
      >>> print(state[0].mu["dense"]["kernel"].size, state[0].nu["dense"]["kernel"].size)
      16384 64
    """
    return _adam_mini(
        AdamMiniHyperparams(
            b1=b1,
            b2=b2,
            eps=eps,
            num_heads=num_heads,
            partition=partition,
            mu_dtype=mu_dtype,
        ),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        maximize=maximize,
    )


REGISTRY_ROWS = (
    OptimizerInfo(
        name="adam_mini",
        alias=adam_mini,
        group="variant",
        summary=(
            "one second moment per Hessian block (output neuron, head, token): half Adam's state"
        ),
        paper=Paper(
            authors="Zhang, Chen, Li, Ding, Chen, Kingma, Ye, Luo and Sun",
            title="Adam-mini: Use Fewer Learning Rates To Gain More",
            url="https://arxiv.org/abs/2406.16793",
            venue="ICLR 2025",
        ),
        transformation=scale_by_adam_mini,
        companions=("adam_mini_block_shape", "adam_mini_partition"),
    ),
)
