"""A GPT-style decoder in Flax NNX: byte embeddings, pre-norm blocks of causal attention and an
MLP, an untied output head.

Every weight is used through :func:`gathered`. Under a mesh whose ``fsdp`` axis splits the
params (FSDP), that is the all-gather of the weight before its layer runs, and its gradient
is the reduce-scatter back to the shards, so no device keeps more than its shard of a weight
between layers; without a mesh it does nothing, and the model runs as any NNX module.

Mixed precision (``compute_dtype="bfloat16"``, with float32 params): every matrix product (the
embedding's, the layers' and the head's) and the attention run in bfloat16, the weights cast as
they are used, as nanoGPT's autocast, levanter's ``compute_dtype`` and MaxText's ``dtype`` do;
the params, their gradients, the residual stream, the norms and the loss stay float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The shape of the model; the defaults train in minutes on two CPU cores."""

    vocab: int = 256  # bytes
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    mlp_ratio: int = 4
    seq_len: int = 128
    param_dtype: str = "float32"
    # The matrix products' and attention's dtype with float32 params; bfloat16 params compute
    # in bfloat16 whichever this is (:attr:`matmul_dtype`).
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} must be a multiple of heads {self.heads}")

    @property
    def matmul_dtype(self) -> str:
        """What the matrix products and attention run in: bfloat16 where the params or the
        compute dtype are, else float32."""
        return "bfloat16" if "bfloat16" in (self.param_dtype, self.compute_dtype) else "float32"


def gathered(weight: jax.Array) -> jax.Array:
    """``weight`` whole on every device of the current mesh (none: ``weight`` itself)."""
    if jax.sharding.get_abstract_mesh().empty:
        return weight
    return jax.sharding.reshard(weight, PartitionSpec())


def normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: str) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))


class Dense(nnx.Module):
    """``x @ kernel + bias`` computed in ``compute_dtype`` (the weights cast as used, so their
    gradients arrive in their own dtype)."""

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        *,
        std: float,
        rngs: nnx.Rngs,
        dtype: str,
        compute_dtype: str,
    ):
        self.kernel = normal(rngs, (fan_in, fan_out), std, dtype)
        self.bias = nnx.Param(jnp.zeros((fan_out,), dtype))
        self.compute_dtype = compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = gathered(self.kernel[...]), gathered(self.bias[...])
        dtype = self.compute_dtype
        return x.astype(dtype) @ kernel.astype(dtype) + bias.astype(dtype)


class LayerNorm(nnx.Module):
    def __init__(self, d: int, *, dtype: str):
        self.scale = nnx.Param(jnp.ones((d,), dtype))
        self.bias = nnx.Param(jnp.zeros((d,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = x.mean(-1, keepdims=True)
        variance = ((x - mean) ** 2).mean(-1, keepdims=True)
        normed = (x - mean) * jax.lax.rsqrt(variance + 1e-5)
        return normed * gathered(self.scale[...]) + gathered(self.bias[...])


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, dtype = config.d_model, config.param_dtype
        dense = {"rngs": rngs, "dtype": dtype, "compute_dtype": config.matmul_dtype}
        # GPT-2's init: std 0.02, the residual projections scaled by 1 / sqrt(2 * layers).
        residual_std = 0.02 / (2 * config.layers) ** 0.5
        self.heads = config.heads
        self.norm1 = LayerNorm(d, dtype=dtype)
        self.qkv = Dense(d, 3 * d, std=0.02, **dense)
        self.out = Dense(d, d, std=residual_std, **dense)
        self.norm2 = LayerNorm(d, dtype=dtype)
        self.up = Dense(d, config.mlp_ratio * d, std=0.02, **dense)
        self.down = Dense(config.mlp_ratio * d, d, std=residual_std, **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, length, 3, self.heads, d // self.heads)
        attended = jax.nn.dot_product_attention(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True
        )
        x = x + self.out(attended.reshape(batch, length, d))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class GPT(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, dtype = config.d_model, config.param_dtype
        self.vocab, self.compute_dtype = config.vocab, config.matmul_dtype
        self.embed = normal(rngs, (config.vocab, d), 0.02, dtype)
        self.position = normal(rngs, (config.seq_len, d), 0.01, dtype)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.layers)])
        self.norm = LayerNorm(d, dtype=dtype)
        self.head = Dense(
            d, config.vocab, std=0.02, rngs=rngs, dtype=dtype, compute_dtype=config.matmul_dtype
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """The next-token logits, ``(batch, length, vocab)``, of ``(batch, length)`` tokens."""
        # A one-hot product rather than a gather: it keeps the batch's sharding without
        # stating it, and costs what the head costs at a byte vocabulary.
        embed = gathered(self.embed[...]).astype(self.compute_dtype)
        x = jax.nn.one_hot(tokens, self.vocab, dtype=self.compute_dtype) @ embed
        # The residual stream in the params' dtype (the position table's): float32 under
        # mixed precision, each layer's bfloat16 output added to it.
        x = x + gathered(self.position[...])[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def loss_fn(model: GPT, tokens: jax.Array) -> jax.Array:
    """The mean next-byte cross entropy (nats) over ``(batch, length + 1)`` windows."""
    logits = model(tokens[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
