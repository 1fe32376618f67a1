"""Why a run stopped: the exceptions the command line turns into a message and an exit status.

Each carries a complete, user-facing message; the programs (``python -m examples.mnist``,
``python -m examples.lm``) print it without a traceback and exit with
:attr:`TrainingError.exit_status`.
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are the one line that says what is wrong and a pointer
    to ``--help`` (argparse puts its whole usage block first, which buries that line)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nSee '{self.prog} --help' for the options.\n")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` that gives each option's default once: ``(default: X)`` after the help of an
    option whose default is a value, unless the help already says what its default means
    (``(default: ...)``, ``(None: ...)``); nothing for a default of None or a switch's."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "(default" in text
            or "(None" in text
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or default == []
            or action.nargs == 0
        ):
            return text
        return f"{text} (default: %(default)s)".strip()


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""

    exit_status = 1


class DeviceError(TrainingError):
    """The devices or processes asked for are not there, or do not fit the batch."""


class CheckpointError(TrainingError):
    """No checkpoint can be resumed: none is intact, or they belong to a different run."""


class NonFiniteError(TrainingError):
    """The loss or the parameters stopped being finite, or too many steps in a row were."""


class Interrupted(TrainingError):
    """SIGTERM or SIGINT stopped the run after step ``step``; ``checkpoint`` is the newest
    checkpoint (of step ``checkpoint_step``: ``step`` unless writing it failed), if any."""

    def __init__(
        self,
        signum: int,
        step: int,
        where: str,
        checkpoint: Path | None,
        checkpoint_step: int | None,
    ):
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.checkpoint_step = checkpoint_step
        self.exit_status = 128 + signum  # The shell's convention for "ended by signal N".
        if checkpoint is None:
            saved = "there is no checkpoint"
        elif checkpoint_step == step:
            saved = f"checkpoint: {checkpoint}"
        else:
            saved = f"the newest checkpoint is of step {checkpoint_step}: {checkpoint}"
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step} ({where}); {saved}"
        )
