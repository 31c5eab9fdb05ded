"""Run `train.py` with one piece deliberately broken, to show a test's bound catches that bug.

    python tests/variants.py VARIANT -- [train.py flags]      (also under torchrun)

VARIANT:
  normaliser-without-world-size   each process divides its summed loss by the step's token count
                                  without the `/ world_size` that undoes DDP's averaging
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train
from gpt2kids import training
from gpt2kids.cli import run_cli

VARIANTS = {
    "normaliser-without-world-size": lambda: setattr(training, "loss_normaliser",
                                                     lambda step_tokens, world_size: max(step_tokens, 1)),
}

if __name__ == "__main__":
    variant, separator, *flags = sys.argv[1:]
    assert separator == "--"
    VARIANTS[variant]()
    run_cli(lambda: train.main(flags))
