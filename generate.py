"""Continue prompts with a GPT-2 model: `python generate.py PROMPT [PROMPT ...] [flags]` (see --help)."""

import sys

from gpt2kids.errors import run_cli
from gpt2kids.generation import main

if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
