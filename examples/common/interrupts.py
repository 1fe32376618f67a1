"""Graceful stop on SIGTERM (what a cluster scheduler sends before preempting) and SIGINT.

The first signal only sets :attr:`StopRequests.signum`; the training loop looks at it between
steps, then writes a checkpoint and stops. A second signal ends the process at once, through
the signal's default action.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Context manager that turns SIGTERM and SIGINT into a request to stop after a step.

    Handlers can only be installed from the main thread; elsewhere this does nothing and
    :attr:`signum` stays ``None``. The previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.signum is not None:
            # Second signal: stop now. Checkpoints are written atomically, so dying in the
            # middle of one leaves only a temporary directory that the next run removes.
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            # None: the handler was not installed from Python; the default is the best guess.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
