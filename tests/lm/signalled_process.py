"""``python tests/lm/signalled_process.py PROCESS STEPS SIGNAL RECORD ARGS...`` runs ``python -m
examples.lm ARGS``, in which process PROCESS (of several) sends itself SIGNAL (``SIGTERM``,
``SIGKILL``) once it has dispatched STEPS steps, as a scheduler that signals one host would, and
writes the moment (``time.monotonic()``, the same clock in every process) to the file RECORD
first. The repository root must be on PYTHONPATH.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from examples.lm.main import prepare

if __name__ == "__main__":
    process, steps, signal_name, record, *argv = sys.argv[1:]
    prepare(argv)  # before JAX starts

    import jax
    import numpy as np

    from examples.lm import main, train

    if jax.process_index() == int(process):
        step, done = train.Trainer.step, []

        def signalled(self: train.Trainer, windows: np.ndarray) -> None:
            step(self, windows)
            done.append(1)
            if len(done) == int(steps):
                Path(record).write_text(str(time.monotonic()))
                signal.raise_signal(signal.Signals[signal_name])

        train.Trainer.step = signalled  # type: ignore[method-assign]
    main.main(argv)
