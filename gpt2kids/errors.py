"""Errors meant for people.

A `UserError` carries one line that names what was wrong and what to do about it. The command-line
entry points print it to stderr and exit with status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user: a path, a flag value, a file that cannot be read."""


class Stopped(Exception):
    """A run stopped on request (Ctrl-C, SIGTERM) after saving its state: not an error."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def die(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (what was wrong, where to look), exit status 2."""

    def error(self, message: str) -> NoReturn:
        die(f"{message} (see {self.prog} --help)")


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a command-line `main`, turning `UserError` into one line on stderr and exit status 2."""
    try:
        status = main()
    except UserError as error:
        die(str(error))
    except Stopped as stop:
        print(str(stop), file=sys.stderr)
        raise SystemExit(stop.exit_status) from None
    except KeyboardInterrupt:  # Ctrl-C where no one handles it (a second one, while training): no traceback
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(status or 0)
