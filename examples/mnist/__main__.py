"""``python -m examples.mnist``: see :mod:`examples.mnist.main`."""

from examples.mnist.main import main

main()
