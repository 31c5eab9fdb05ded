"""Errors meant for people: `gpt2kids.cli.run_cli` prints them as one line, with no traceback; and warnings."""

from __future__ import annotations

import sys


def warn(message: str) -> None:
    """One line on stderr about something that did not stop the work."""
    print(f"warning: {message}", file=sys.stderr)


class UserError(Exception):
    """Bad input (a path, a flag value, an unreadable file): one line naming the problem and the fix; exit 2."""


class Stopped(Exception):
    """A run stopped on request (Ctrl-C, SIGTERM) after saving its state: not an error."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status
