"""One of two processes that train SOAP with its blocks spread over both processes' devices
(``tests/test_soap_spread.py::test_two_processes_spread_blocks_as_one_device``).

Run as ``python soap_spread_worker.py PROCESS_ID PORT``: 4 CPU devices per process, joined
through ``jax.distributed`` (gloo collectives); prints one JSON line: the largest difference
between its updates and those of the same steps on this process's first device alone, and the
bytes of the factors and bases that its fullest device holds and that the single device holds.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adam_jax  # noqa: E402
from examples.common import distributed  # noqa: E402

SHAPES = {"w1": (64, 128), "w2": (128, 32), "b": (128,)}
OPTIONS = {"block_size": 16, "precondition_frequency": 2, "weight_decay": 0.0}
STEPS = 4


def tree(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def main(process_id: int, port: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    params, grads = tree(0), [tree(1 + i) for i in range(STEPS)]

    single = adam_jax.soap(1e-2, **OPTIONS)
    local = jax.local_devices()[0]
    state = single.init(jax.device_put(params, local))
    want = []
    for g in grads:
        u, state = jax.jit(single.update)(jax.device_put(g, local), state, params)
        want.append(u)
    single_bytes = adam_jax.state_bytes((state[0].gg, state[0].q))

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    with jax.set_mesh(mesh):
        tx = adam_jax.soap(1e-2, block_axis="data", **OPTIONS)
        whole = NamedSharding(mesh, P())
        placed = jax.device_put(params, whole)
        state = jax.jit(tx.init)(placed)
        difference = 0.0
        for g, w in zip(grads, want, strict=True):
            u, state = jax.jit(tx.update)(jax.device_put(g, whole), state, placed)
            for k in SHAPES:
                ours = np.asarray(u[k].addressable_data(0))
                difference = max(difference, float(np.max(np.abs(ours - np.asarray(w[k])))))
        fullest = adam_jax.device_state_bytes((state[0].gg, state[0].q))
    record = {"difference": difference, "fullest": fullest, "single": single_bytes}
    print(json.dumps({**record, "devices": jax.device_count()}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
