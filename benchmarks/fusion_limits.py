"""What XLA fuses of a quantized moment's step, read on small programs compiled for an H100 and
a TPU v5p that are not there (issue 65's limits; docs/speed.md, "What keeps issue 65's ratios
out of reach").

Each row is one program, jitted and compiled by :func:`benchmarks.accelerators.compile_for`,
and what :mod:`benchmarks.hlo_program` reads of it:

* ``independent updates``: twelve leaves of 768 elements, each ``p - 0.1 g g``: one kernel each
  where XLA:GPU fuses no independent kernels side by side (horizontal fusion).
* ``block maxima, then codes``: one moment of ``4096 x 768`` decoded from its codes and block
  scales (runs of 256), stepped, its new block maxima taken and the moment divided by them and
  rounded to codes: Triton's normalization fusion (a softmax's pattern) makes it one kernel,
  but not over donated codes (it writes a new buffer, copied back), nor with the new scales as
  a second output, nor from ``uint8`` codes.
* ``8-bit AdamW, one leaf``: one ``4096 x 768`` leaf's AdamW step with 8-bit moments on a v5p,
  in today's blocks (runs of 256 along a row) and in other tiles of the same leaf (rows x
  columns), beside float32 AdamW's: only the chip's own tile, 8 x 128, keeps the step in the
  leaf's layout.

    python -m benchmarks.fusion_limits [--out rows.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import accelerators

ROWS, COLUMNS, BLOCK = 4096, 768, 256
#: Tiles of the v5p rows, (rows, columns) of a block: today's runs first.
TILES = ((1, 256), (8, 128), (2, 128), (8, 32), (16, 128))


def _row(name: str, target: str, compiled: accelerators.Compiled, **setting: Any) -> dict:
    from benchmarks.hlo_program import read_program

    summary = read_program(compiled.text).summary()
    return {
        "program": name,
        "target": target,
        **setting,
        "kernels": summary["kernels"],
        "fusions": summary["fusions"],
        "copies": summary["copies"],
        "kernel_mb": round(summary["kernel_bytes"] / 1e6, 1),
        "temporaries_mib": round(compiled.memory["temporaries"] / 2**20, 2),
        "compile_s": round(compiled.compile_s, 2),
    }


def _on(target: str) -> Any:
    import jax

    return jax.sharding.SingleDeviceSharding(accelerators.devices(accelerators.TARGETS[target])[0])


def independent_updates() -> dict:
    import jax
    import jax.numpy as jnp

    leaf = jax.ShapeDtypeStruct((768,), jnp.float32, sharding=_on("h100"))
    params = {f"b{i:02d}": leaf for i in range(12)}

    def step(params: Any, grads: Any) -> Any:
        return jax.tree.map(lambda p, g: p - 0.1 * g * g, params, grads)

    compiled = accelerators.compile_for(step, (params, params), (0,))
    return _row("independent updates", "h100", compiled, leaves=12)


def block_maxima_then_codes(codes_dtype: str, donated: bool, with_scales: bool) -> dict:
    import jax
    import jax.numpy as jnp

    on = _on("h100")
    blocks = COLUMNS // BLOCK
    grad = jax.ShapeDtypeStruct((ROWS, COLUMNS), jnp.float32, sharding=on)
    codes = jax.ShapeDtypeStruct((ROWS, COLUMNS), jnp.dtype(codes_dtype), sharding=on)
    scales = jax.ShapeDtypeStruct((ROWS, blocks), jnp.float32, sharding=on)

    def step(grad: jax.Array, codes: jax.Array, scales: jax.Array) -> Any:
        old = codes.reshape(ROWS, blocks, BLOCK).astype(jnp.float32) * scales[..., None]
        new = 0.9 * old + 0.1 * grad.reshape(ROWS, blocks, BLOCK)
        maxima = jnp.max(jnp.abs(new), axis=-1)
        normalized = new / jnp.maximum(maxima, 1e-45)[..., None]
        new_codes = jnp.round(127 * normalized + 127).astype(codes.dtype).reshape(codes.shape)
        return (new_codes, maxima) if with_scales else new_codes

    compiled = accelerators.compile_for(step, (grad, codes, scales), (1, 2) if donated else ())
    return _row(
        "block maxima, then codes",
        "h100",
        compiled,
        codes=codes_dtype,
        donated=donated,
        with_scales=with_scales,
    )


def eight_bit_leaf(tile: tuple[int, int] | None) -> dict:
    """AdamW's step of one leaf on a v5p: float32 moments (``tile`` ``None``), or 8-bit moments
    in blocks of ``tile`` (the storage reads its blocks from the scales' shape)."""
    import jax
    import jax.numpy as jnp
    import optax

    import adam_jax
    from adam_jax.quantization import QuantizedArray, is_quantized

    on = _on("v5p")
    params = {"w": jax.ShapeDtypeStruct((ROWS, COLUMNS), jnp.float32, sharding=on)}
    tx = adam_jax.adamw(1e-3) if tile is None else adam_jax.adamw_8bit(1e-3)
    state = jax.eval_shape(tx.init, params)
    if tile is not None:
        scale_shape = (math.ceil(ROWS / tile[0]), math.ceil(COLUMNS / tile[1]))

        def retiled(x: Any) -> Any:
            if not is_quantized(x):
                return x
            return QuantizedArray(x.codes, jax.ShapeDtypeStruct(scale_shape, jnp.float32))

        state = jax.tree.map(retiled, state, is_leaf=is_quantized)

    def step(params: Any, grads: Any, state: Any) -> Any:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    args = (params, params, accelerators.placed(state, on))
    compiled = accelerators.compile_for(step, args, (0, 2))
    name = "AdamW, one leaf" if tile is None else "8-bit AdamW, one leaf"
    return _row(name, "v5p", compiled, tile=None if tile is None else "x".join(map(str, tile)))


def programs() -> list[Callable[[], dict]]:
    return [
        independent_updates,
        *(
            functools.partial(block_maxima_then_codes, codes, donated, scales)
            for codes, donated, scales in (
                ("int8", False, False),
                ("int8", True, False),
                ("int8", True, True),
                ("uint8", False, False),
            )
        ),
        *(functools.partial(eight_bit_leaf, tile) for tile in (None, *TILES)),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fusion_limits", description=__doc__)
    parser.add_argument("--out", type=Path, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    accelerators.enable_or_exit(parser)
    rows = []
    for program in programs():
        rows.append(program())
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
