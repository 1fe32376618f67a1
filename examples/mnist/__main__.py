"""``python -m examples.mnist``: see :mod:`examples.mnist.main`."""

import sys

from examples.common import distributed

# Host devices and jax.distributed, before anything creates JAX's backend (importing adam_jax
# does).
distributed.prepare(sys.argv[1:], prog="python -m examples.mnist")

from examples.mnist.main import main, quiet_leftovers_of_failed_writes  # noqa: E402

quiet_leftovers_of_failed_writes()
main()
