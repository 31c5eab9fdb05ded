"""python generate.py: continue prompts with a GPT-2 model (the flags: python generate.py --help)."""

from __future__ import annotations

from gpt2kids.cli import quiet_interrupt_while_starting

if __name__ == "__main__":
    quiet_interrupt_while_starting()  # before torch's import

import sys

from gpt2kids.cli import run_cli
from gpt2kids.generate_command import run
from gpt2kids.generate_config import parse_args


def main(argv: list[str]) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
