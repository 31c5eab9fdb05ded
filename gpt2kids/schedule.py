"""Learning-rate schedules: a multiplier of the peak rate for each optimizer step (for LambdaLR).

They follow the Hugging Face definitions, so `--schedule linear` with no warm-up is the published
model's schedule: the rate falls linearly from the peak to 0 over the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("linear", "cosine", "constant")


def lr_lambda(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def warmup(step: int) -> float | None:
        return step / warmup_steps if step < warmup_steps else None

    def linear(step: int) -> float:
        rising = warmup(step)
        if rising is not None:
            return rising
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    def cosine(step: int) -> float:
        rising = warmup(step)
        if rising is not None:
            return rising
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))

    def constant(step: int) -> float:
        rising = warmup(step)
        return rising if rising is not None else 1.0

    return {"linear": linear, "cosine": cosine, "constant": constant}[name]
