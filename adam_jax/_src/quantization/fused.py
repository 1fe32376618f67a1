"""The fused 8-bit Adam leaf step: one Pallas kernel that decodes both moments, steps them and
encodes them again.

Today's step (:func:`adam_jax.rules.scale_by_rule` with :class:`BlockwiseQuantized` moments) decodes
the codes, runs the rule and re-encodes as separate XLA operations; on a GPU XLA does not fuse
the block maxima with the encode, so the step moves more bytes than its arrays hold. The kernel
here is one pass per leaf: it reads the gradient and the two moments' codes and block scales,
and writes the update, the new codes and the new scales (:func:`fused_adam_leaf`).

It runs for the common case only (:func:`kernel_layout`): Adam's rule (``AdamRule``, without
AMSGrad; Nesterov, ``bias_correction`` and ``eps_root`` included) with constant ``eps`` and
``eps_root``, float32 gradients, both moments stored in 8-bit blocks that are contiguous runs
of the flattened leaf of a power-of-two length (the vector's last block may be shorter), no
typed sharding, no mesh of several devices set (``jax.set_mesh``: the kernel is one custom
call, which the partitioner would not split). Everything else keeps today's path. The storages'
``kernel`` option chooses:

- ``"xla"`` (the default): today's path always;
- ``"auto"``: the kernel on a CUDA GPU (``jax.lax.platform_dependent``), today's XLA path on
  every other backend and for every other leaf. ``jax.export`` for CUDA then needs
  ``disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]``
  (a Triton kernel has no compatibility guarantee);
- ``"pallas"``: the kernel, and an error where it cannot run (a backend that is not a GPU, a
  leaf it does not cover);
- ``"interpret"``: the kernel in Pallas' interpret mode on any backend (the tests: its codes,
  scales and updates are bit for bit today's path's on a CPU).

The kernel's arithmetic is today's, operation for operation: the moments decoded as
``decode(code) * scale``, the rule's own ``update``, the new scale the block's largest
magnitude (zero blocks divide by 1), the codes :func:`dynamic_map.encode` of the moment over
its scale. In interpret mode on CPU it is bit for bit the XLA path with XLA's algebraic
simplifier off; with it on, XLA:CPU turns some divisions by a broadcast scalar into products by
its reciprocal, differently in the two programs (up to 2 ulps of an update, one code). On a GPU
the Triton compiler may contract a multiply and an add into an FMA and divides approximately
(``div.full.f32``), where XLA may not: a code may then differ by one step from XLA's
(``benchmarks/gpu_checks.py`` measures it).

Measured on one H100 (docs/speed.md, "On a GPU"): the kernel is no faster than the XLA path
(1.88x float32's step on a 16M leaf against the XLA path's 1.20x; its best tiling equal to
it), hence ``"xla"`` stays the default. On a 1000 x 64 leaf of hard gradients the two paths
ended as far apart as the params moved in 20 steps: the XLA path's moved 2,058, by elements
whose second moment the 8-bit map rounded to zero (its next update then its first moment
over one small gradient's share), which rounding decides on either path; on the CPU both
paths, alike, take updates 240 times the rate there (docs/speed.md, "On a GPU").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from adam_jax._src.numerics import compute_dtype, real_dtype
from adam_jax._src.quantization.blocks import QuantizedArray, is_quantized
from adam_jax._src.quantization.dynamic_map import decode, encode, map_constants
from adam_jax._src.storage import same_container
from adam_jax._src.typed_sharding import typed_sharding

KERNEL_MODES = ("auto", "xla", "pallas", "interpret")
#: Elements one program of the kernel steps (whole blocks; fewer when a block is longer), and
#: the warps that run it (read when a step is traced: ``benchmarks/gpu_checks.py`` tries
#: others).
CHUNK_ELEMENTS = 4096
NUM_WARPS = 4
#: The longest block a program holds at once (a longer one takes the XLA path).
MAX_BLOCK = 8192


def check_kernel_mode(kernel: str) -> None:
    if kernel not in KERNEL_MODES:
        raise ValueError(f"kernel must be one of {KERNEL_MODES}, got {kernel!r}")


def contiguous_block(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> int | None:
    """The length of a block when the blocks of a leaf of ``shape`` with scales of
    ``scale_shape`` are runs of the flattened leaf one after the other (only a vector's last
    block may be shorter), else ``None``."""
    size = math.prod(shape)
    count = math.prod(scale_shape)
    if size == 0 or count == 0 or len(shape) != len(scale_shape):
        return None
    if len(shape) == 1:
        return math.ceil(size / count)
    if scale_shape[:-2] != shape[:-2]:
        return None
    rows, columns = shape[-2:]
    row_blocks, column_blocks = scale_shape[-2:]
    if row_blocks == rows and columns % column_blocks == 0:
        return columns // column_blocks
    if column_blocks == 1 and rows % row_blocks == 0:
        return rows // row_blocks * columns
    return None


def static_number(x: Any) -> bool:
    """Whether ``x`` is a Python number (a kernel's constant), not an array."""
    return isinstance(x, int | float) and not isinstance(x, bool)


def kernel_layout(trees: list[Any], grad: Any) -> tuple[int | None, str]:
    """``(block, "")`` when the kernel can step a leaf of Adam's rule whose stored moments are
    ``trees`` (the block's length), else ``(None, why not)``."""
    if grad.dtype != jnp.float32:
        return None, f"the gradient is {grad.dtype}, not float32"
    if not all(is_quantized(t) and isinstance(t, QuantizedArray | dict) for t in trees):
        return None, "a moment of the leaf is not stored in 8-bit blocks"
    mu, nu = trees
    if any(tuple(_field(t, "codes").shape) != tuple(grad.shape) for t in trees):
        return None, "the codes do not have the leaf's shape"
    scale_shape = tuple(_field(mu, "absmax").shape)
    if tuple(_field(nu, "absmax").shape) != scale_shape:
        return None, "the two moments have different blocks"
    if any(typed_sharding(x) is not None for x in jax.tree.leaves((grad, trees))):
        return None, "the leaf is sharded (an Explicit mesh)"
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        # A kernel is one custom call that the partitioner cannot split: on an Auto mesh it
        # would gather a sharded leaf (ZeRO-1's state) onto every device.
        return None, "the step runs under a mesh of several devices"
    block = contiguous_block(tuple(grad.shape), scale_shape)
    if block is None:
        return None, f"the blocks of a {tuple(grad.shape)} leaf are not runs of its elements"
    if block & (block - 1):
        return None, f"the blocks have {block} elements, not a power of two"
    if block > MAX_BLOCK:
        return None, f"the blocks have {block} elements, more than {MAX_BLOCK}"
    return block, ""


def _field(stored: Any, name: str) -> Any:
    return stored[name] if isinstance(stored, dict) else getattr(stored, name)


def _kernel(
    *refs: Any,
    size: int,
    count: int,
    block: int,
    rows: int,
    update: Any,
    scalar_tree: Any,
    static_scalars: tuple[Any, ...],
    array_positions: tuple[int, ...],
) -> None:
    """One program: ``rows`` blocks of ``block`` elements (masked past the leaf's end)."""
    num_arrays = len(array_positions)
    scalar_refs, refs = refs[:num_arrays], refs[num_arrays:]
    g_ref, mu_codes_ref, mu_scales_ref, nu_codes_ref, nu_scales_ref = refs[:5]
    u_ref, mu_codes_out, mu_scales_out, nu_codes_out, nu_scales_out = refs[5:]
    leaves = list(static_scalars)
    for position, ref in zip(array_positions, scalar_refs, strict=True):
        leaves[position] = ref[...]
    scalars = jax.tree.unflatten(scalar_tree, leaves)

    first = pl.program_id(0) * rows
    block_index = first + jax.lax.iota(jnp.int32, rows)
    in_leaf_blocks = block_index < count
    element = block_index[:, None] * block + jax.lax.iota(jnp.int32, block)[None, :]
    in_leaf = element < size

    def load_moment(codes_ref: Any, scales_ref: Any, signed: bool) -> jax.Array:
        zero = map_constants(signed).zero_code
        codes = plgpu.load(codes_ref.at[element], mask=in_leaf, other=zero)
        scales = plgpu.load(scales_ref.at[block_index], mask=in_leaf_blocks, other=0.0)
        return decode(codes, signed) * scales[:, None]

    def store_moment(value: jax.Array, codes_ref: Any, scales_ref: Any, signed: bool) -> None:
        absmax = jnp.max(jnp.abs(value), axis=1)
        safe = jnp.where(absmax > 0, absmax, 1.0)
        codes = encode(value / safe[:, None], signed)
        plgpu.store(codes_ref.at[element], codes, mask=in_leaf)
        plgpu.store(scales_ref.at[block_index], absmax, mask=in_leaf_blocks)

    g = plgpu.load(g_ref.at[element], mask=in_leaf, other=0.0)
    moments = {
        "mu": load_moment(mu_codes_ref, mu_scales_ref, True),
        "nu": load_moment(nu_codes_ref, nu_scales_ref, False),
    }
    u, new = update(g, moments, scalars)
    plgpu.store(u_ref.at[element], u.astype(jnp.float32), mask=in_leaf)
    store_moment(new["mu"], mu_codes_out, mu_scales_out, True)
    store_moment(new["nu"], nu_codes_out, nu_scales_out, False)


def fused_adam_leaf(
    update: Callable[[jax.Array, dict[str, jax.Array], Any], Any],
    scalars: Any,
    grad: jax.Array,
    mu: Any,
    nu: Any,
    block: int,
    *,
    interpret: bool = False,
) -> tuple[jax.Array, list[Any]]:
    """One leaf's Adam step in one kernel: ``(update, [new mu, new nu])`` as
    :func:`adam_jax.rules.scale_by_rule` returns them, for a leaf that :func:`kernel_layout` accepts
    (its ``block``); ``update(g, moments, scalars)`` is the rule's update of a block's elements
    (``{"mu": ..., "nu": ...}`` decoded, the step scalars) to their update and new moments."""
    shape = tuple(grad.shape)
    scale_shape = tuple(_field(mu, "absmax").shape)
    size, count = math.prod(shape), math.prod(scale_shape)
    rows = max(1, CHUNK_ELEMENTS // block)
    leaves, scalar_tree = jax.tree.flatten(scalars)
    array_positions = tuple(i for i, x in enumerate(leaves) if not static_number(x))
    static_scalars = tuple(None if i in array_positions else x for i, x in enumerate(leaves))
    arrays = [jnp.asarray(leaves[i], jnp.float32) for i in array_positions]

    kernel = functools.partial(
        _kernel,
        size=size,
        count=count,
        block=block,
        rows=rows,
        update=update,
        scalar_tree=scalar_tree,
        static_scalars=static_scalars,
        array_positions=array_positions,
    )
    codes_type = jax.ShapeDtypeStruct((size,), jnp.uint8)
    scales_type = jax.ShapeDtypeStruct((count,), jnp.float32)
    out_shape = (
        jax.ShapeDtypeStruct((size,), jnp.float32),
        codes_type,
        scales_type,
        codes_type,
        scales_type,
    )
    flat = [
        grad.reshape(size),
        _field(mu, "codes").astype(jnp.uint8).reshape(size),
        _field(mu, "absmax").astype(jnp.float32).reshape(count),
        _field(nu, "codes").astype(jnp.uint8).reshape(size),
        _field(nu, "absmax").astype(jnp.float32).reshape(count),
    ]
    u, mu_codes, mu_scales, nu_codes, nu_scales = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(count, rows),),
        # The new codes and scales overwrite the old (a donated state is updated in place;
        # each program reads its blocks before it writes them).
        input_output_aliases={len(arrays) + i: i for i in range(1, 5)},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS),
        name="adam_8bit_leaf",
    )(*arrays, *flat)
    new_mu = QuantizedArray(mu_codes.reshape(shape), mu_scales.reshape(scale_shape))
    new_nu = QuantizedArray(nu_codes.reshape(shape), nu_scales.reshape(scale_shape))
    return u.reshape(shape), [same_container(mu, new_mu), same_container(nu, new_nu)]


def _mode(storages: list[Any]) -> str:
    """The storages' common ``kernel`` mode (``"xla"`` unless all of them choose one)."""
    modes = {getattr(s, "kernel", "xla") for s in storages}
    return modes.pop() if len(modes) == 1 else "xla"


def leaf_step(
    arithmetic: Callable[[list[Any]], tuple[jax.Array, list[Any]]],
    update: Callable[[jax.Array, dict[str, jax.Array], Any], Any],
    why_not: str,
    storages: list[Any],
    scalars_for: Callable[[Any], Any],
    trees: list[Any],
    grad: jax.Array,
) -> tuple[jax.Array, list[Any]]:
    """One leaf of Adam's rule stepped by the fused kernel where the storages ask for it and it
    can run, else by ``arithmetic(trees)`` (the core's path).

    Args:
      arithmetic: the core's step of the leaf from its stored moments.
      update: the rule's update of decoded moments (see :func:`fused_adam_leaf`).
      why_not: why the rule's settings keep the kernel out, or ``""`` where they allow it.
      storages: the two moments' storages, whose ``kernel`` mode chooses.
      scalars_for: the step scalars by real dtype, as the core computed them.
      trees: the leaf's stored ``mu`` and ``nu``.
      grad: the leaf's gradient.
    """
    mode = _mode(storages)
    if mode == "xla" or not any(is_quantized(t) for t in trees):
        return arithmetic(trees)
    block, why_not = (None, why_not) if why_not else kernel_layout(trees, grad)
    if block is None:
        if mode == "pallas":
            raise ValueError(f"BlockwiseQuantized(kernel='pallas') cannot step the leaf: {why_not}")
        return arithmetic(trees)
    # The key the core computes the step scalars under before the step (a slice's step runs
    # inside a loop: scalars made there would leak from it into the cache).
    scalars = scalars_for(real_dtype(compute_dtype(grad.dtype)))
    mu, nu = trees
    if mode == "interpret":
        return fused_adam_leaf(update, scalars, grad, mu, nu, block, interpret=True)
    if mode == "pallas":
        if jax.default_backend() != "gpu":
            raise ValueError(
                "BlockwiseQuantized(kernel='pallas') runs on a CUDA GPU only, not on the "
                f"{jax.default_backend()} backend: use kernel='auto' (or 'interpret')"
            )
        return fused_adam_leaf(update, scalars, grad, mu, nu, block)

    def kernel(trees: list[Any]) -> tuple[jax.Array, list[Any]]:
        return fused_adam_leaf(update, scalars, grad, trees[0], trees[1], block)

    result: tuple[jax.Array, list[Any]] = jax.lax.platform_dependent(
        trees, cuda=kernel, default=arithmetic
    )
    return result
