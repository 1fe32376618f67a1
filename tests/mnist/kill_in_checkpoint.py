"""The training program, killing itself with SIGKILL in the middle of writing a checkpoint.

``python tests/mnist/kill_in_checkpoint.py POINT STEP ARGS...`` runs
``python -m examples.mnist ARGS...`` and sends itself SIGKILL while it writes the checkpoint of
step STEP, at POINT: ``arrays`` (the arrays are in the checkpoint's temporary directory, the
JSON record may not be) or ``record`` (the JSON record is written, the arrays may still be
being written, the checkpoint is not committed). The repository root must be on PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from examples.mnist import main

HANDLERS = {"arrays": ocp.StandardCheckpointHandler, "record": ocp.JsonCheckpointHandler}


def kill_after_writing(handler: Any, step: int) -> None:
    """Makes ``handler`` SIGKILL the process once it has written its item of step ``step``."""
    original = handler.async_save

    async def async_save(self: Any, directory: Any, *args: Any, **kwargs: Any) -> Any:
        futures = await original(self, directory, *args, **kwargs)
        # directory is <checkpoints>/<step>.orbax-checkpoint-tmp/<item>.
        if int(Path(directory).parent.name.split(".")[0]) == step:
            for future in futures or ():
                future.result()
            os.kill(os.getpid(), signal.SIGKILL)
        return futures

    handler.async_save = async_save


if __name__ == "__main__":
    point, step, *args = sys.argv[1:]
    kill_after_writing(HANDLERS[point], int(step))
    main.main(args)
