"""python train.py: fine-tune GPT-2 on Indonesian children's stories (the flags: python train.py --help)."""

from __future__ import annotations

from gpt2kids.cli import quiet_interrupt_while_starting

if __name__ == "__main__":
    quiet_interrupt_while_starting()  # before torch's import

from gpt2kids.cli import run_cli
from gpt2kids.train_config import parse_args
from gpt2kids.training import train


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
