"""One of several processes that wait for each other in collectives, as a training run's do;
process ``--dies`` ends itself with SIGKILL after a few of them, writing the moment
(``time.monotonic()``, the same clock in every process) to ``--record``; a survivor whose
collective fails for it says so, as the programs do (:func:`distributed.end_for_lost_peer`).

``python tests/lm/dying_worker.py --dies I --record PATH --num-processes P --process-id J
--coordinator HOST:PORT``; the repository root must be on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from examples.common import distributed

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dies", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    distributed.add_process_arguments(parser)
    args = parser.parse_args()
    distributed.join(args)
    for count in range(10**6):
        if count == 20 and args.process_id == args.dies:
            args.record.write_text(str(time.monotonic()))
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            distributed.barrier(f"step {count}")
        except (RuntimeError, ValueError) as error:
            if not distributed.lost_peer(error):
                raise
            distributed.end_for_lost_peer("worker", error, "Resume with: RESUME COMMAND")
    sys.exit("the collectives went on without the dead process")
