"""python generate.py: continue prompts with a GPT-2 model (the flags: python generate.py --help)."""

from __future__ import annotations

import signal

# Ctrl-C while torch imports (a second or so) ends the process quietly, not in a traceback; run_cli then
# puts Python's KeyboardInterrupt back. (A SIGINT the shell ignores, as for a background job, stays ignored.)
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import sys

from gpt2kids.cli import run_cli
from gpt2kids.generate_command import run
from gpt2kids.generate_config import parse_args


def main(argv: list[str]) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
