"""Errors meant for people.

A `UserError` carries one line that names what was wrong and what to do about it; the command lines
(`gpt2kids.cli.run_cli`) print it to stderr and exit with status 2, with no traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a path, a flag value, a file that cannot be read."""


class Stopped(Exception):
    """A run stopped on request (Ctrl-C, SIGTERM) after saving its state: not an error."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status
