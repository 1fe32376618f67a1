"""``python tests/lm/signalled_process.py PROCESS STEPS ARGS...`` runs ``python -m examples.lm
ARGS``, in which process PROCESS (of several) sends itself SIGTERM once it has dispatched STEPS
steps, as a scheduler that signals one host would. The repository root must be on PYTHONPATH.
"""

from __future__ import annotations

import signal
import sys

from examples.lm.main import prepare

if __name__ == "__main__":
    process, steps, *argv = sys.argv[1:]
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
                signal.raise_signal(signal.SIGTERM)

        train.Trainer.step = signalled  # type: ignore[method-assign]
    main.main(argv)
