"""What a long training run needs, shared by the example programs (``examples.mnist``,
``examples.lm``): devices and processes (:mod:`~examples.common.distributed`, and the
launcher of several local processes), orbax checkpoints, ``metrics.jsonl``, graceful stops, and
the errors the command lines report."""
