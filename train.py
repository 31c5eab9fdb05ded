"""python train.py: fine-tune GPT-2 on Indonesian children's stories (the flags: python train.py --help)."""

from __future__ import annotations

import signal

# Ctrl-C while torch imports (a second or so) ends the process quietly, not in a traceback; run_cli then
# puts Python's KeyboardInterrupt back. (A SIGINT the shell ignores, as for a background job, stays ignored.)
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

from gpt2kids.cli import run_cli
from gpt2kids.train_config import parse_args
from gpt2kids.training import train


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
