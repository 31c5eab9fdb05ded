"""Errors meant for people.

A `UserError` carries one line that names what was wrong and what to do about it. The command-line
entry points print it to stderr and exit with status 2, with no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user: a path, a flag value, a file that cannot be read."""


def die(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a command-line `main`, turning `UserError` into one line on stderr and exit status 2."""
    try:
        status = main()
    except UserError as error:
        die(str(error))
    raise SystemExit(status or 0)
