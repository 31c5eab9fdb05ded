"""What every command line shares: one-line errors with exit status 2, the runner around `main`, a quiet Ctrl-C
while it starts, the flags a user gave, and the seed check (the page's seed box uses it too)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from gpt2kids.errors import Stopped, UserError, speaks

EXIT_USAGE = 2
SEED_LIMIT = 2**63  # torch's manual_seed takes seeds below this (it wraps negative ones: refused)


def die(message: str) -> NoReturn:
    if speaks():
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (what was wrong, where to look), exit status 2,
    and shows every flag's default in --help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        die(f"{message} (see {self.prog} --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help (not for switches, which are off); the examples keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:  # not `in`: a default of 0 equals False
            return action.help
        return super()._get_help_string(action)


def check_seed(seed: int | None, name: str = "seed") -> None:
    """Refuse a seed torch cannot take (None: no seed)."""
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise UserError(f"{name} must be a whole number from 0 to {SEED_LIMIT - 1}, got {seed}")


def flags_given(parser: argparse.ArgumentParser, argv: Sequence[str]) -> frozenset[str]:
    """The settings (argparse dests) that `argv` names, whatever their values: one given at its default too.

    It parses `argv` a second time with every default suppressed, so what remains was given; call it after
    the real parse (it changes `parser`'s defaults).
    """
    for action in parser._actions:  # not set_defaults: argparse would convert its SUPPRESS string as a value
        action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_intermixed_args(argv)))


def quiet_interrupt_while_starting() -> None:
    """Until `run_cli` runs, Ctrl-C ends the process quietly: torch's import takes a second or so, and Python's
    KeyboardInterrupt would print a traceback from inside it. Call it before importing torch; `run_cli` puts
    Python's handler back. A SIGINT the shell ignores (a script's background job) stays ignored."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a command-line `main`, turning `UserError` into one line on stderr and exit status 2."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_DFL:  # quiet_interrupt_while_starting set it
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own Ctrl-C again: KeyboardInterrupt
    try:
        status = main()
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except UserError as error:
        die(str(error))
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a killed-by-SIGPIPE tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        raise SystemExit(141) from None  # 128 + SIGPIPE
    except Stopped as stop:
        if speaks():
            print(str(stop), file=sys.stderr)
        raise SystemExit(stop.exit_status) from None
    except KeyboardInterrupt:  # Ctrl-C where no one handles it (a second one, while training): no traceback
        if speaks():
            print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(status or 0)
