"""``python -m examples.mnist``: see :mod:`examples.mnist.main`."""

from examples.mnist.main import main, quiet_leftovers_of_failed_writes

quiet_leftovers_of_failed_writes()
main()
