"""``python -m examples.lm``: see :mod:`examples.lm.main`."""

import sys

from examples.lm.main import prepare

# Host devices and jax.distributed, before anything creates JAX's backend.
prepare(sys.argv[1:])

from examples.lm.main import main  # noqa: E402

main(sys.argv[1:])
