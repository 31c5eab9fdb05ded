"""Errors meant for people: `gpt2kids.cli.run_cli` prints them as one line, with no traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a path, a flag value, an unreadable file): one line naming the problem and the fix; exit 2."""


class Stopped(Exception):
    """A run stopped on request (Ctrl-C, SIGTERM) after saving its state: not an error."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status
