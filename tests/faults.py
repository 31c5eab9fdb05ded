"""Run `train.py` with a fault injected at a named point (used by test_checkpoint.py and test_reporting.py).

    python tests/faults.py POINT:N -- [train.py flags]

POINT is where the process kills itself with SIGKILL (or signals itself) the N-th time it gets there:
  step        inside optimizer step N, after the first forward of the step
  eval        inside the N-th evaluation, at its first forward
  checkpoint  during the N-th checkpoint write, after the weights file is written
  swap        between the two renames of the N-th checkpoint swap
  best-swap, final-swap   between the two renames of the N-th export swap of best/ (final/): the old
              export has just been moved aside to .best.replaced (.final.replaced) and the new one is not in yet
  sigint, sigterm   the signal arrives inside optimizer step N (the run should save and stop)
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train
from gpt2kids import atomic_files, checkpoint, training
from gpt2kids.cli import run_cli


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def inject(point: str, when: int) -> None:
    count = {"n": 0}

    def reached() -> bool:
        count["n"] += 1
        return count["n"] == when

    if point in ("step", "sigint", "sigterm"):
        original_backward = training.backward

        def backward(run, micro_batches):
            if run.progress.step + 1 == when:
                forward = run.forward

                def forward_then_fault(*args, **kwargs):
                    result = forward(*args, **kwargs)
                    if point == "step":
                        die()
                    os.kill(os.getpid(), signal.SIGINT if point == "sigint" else signal.SIGTERM)
                    run.forward = forward
                    return result

                run.forward = forward_then_fault
            return original_backward(run, micro_batches)

        training.backward = backward
    elif point == "eval":
        original_evaluate = training.evaluate

        def evaluate(run):
            if reached():
                run.model.forward = lambda *args, **kwargs: die()
            return original_evaluate(run)

        training.evaluate = evaluate
    elif point == "checkpoint":
        original_save_file = checkpoint.save_file

        def save_file(*args, **kwargs):
            original_save_file(*args, **kwargs)
            if reached():
                die()

        checkpoint.save_file = save_file
    elif point in ("swap", "best-swap", "final-swap"):
        # Where the swap moves the old folder aside: checkpoint-previous/, .best.replaced/ or .final.replaced/.
        aside = checkpoint.PREVIOUS if point == "swap" else f".{point.removesuffix('-swap')}.replaced"
        original_replace = atomic_files.os.replace

        def replace(source, target):
            original_replace(source, target)
            if Path(target).name == aside and reached():
                die()

        atomic_files.os.replace = replace
    else:
        raise SystemExit(f"unknown fault point {point}")


if __name__ == "__main__":
    spec, separator, *flags = sys.argv[1:]
    assert separator == "--"
    point, when = spec.split(":")
    inject(point, int(when))
    sys.argv = ["train.py", *flags]
    run_cli(train.main)
