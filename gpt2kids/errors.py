"""Errors meant for people: `gpt2kids.cli.run_cli` prints them as one line, with no traceback; warnings and notes."""

from __future__ import annotations

import os
import sys


def speaks() -> bool:
    """Whether this process prints warnings and errors: under torchrun only rank 0 does, since every process
    reads the same inputs and would print the same lines, interleaved."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("RANK", "0") == "0"


def say(message: str) -> None:
    """A line on stderr about the work (which model, what a run does); under torchrun from rank 0 only."""
    if speaks():
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """One line on stderr about something that did not stop the work."""
    say(f"warning: {message}")


class UserError(Exception):
    """Bad input (a path, a flag value, an unreadable file): one line naming the problem and the fix; exit 2."""


class Stopped(Exception):
    """A run stopped on request (Ctrl-C, SIGTERM) after saving its state: not an error."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status
