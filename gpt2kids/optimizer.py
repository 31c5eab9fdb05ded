"""AdamW with weight decay on 2-D weights only, and the learning-rate schedules.

The schedules follow the Hugging Face definitions, so `--schedule linear` with no warm-up is the
published model's schedule: the rate falls linearly from the peak to 0 over the run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

SCHEDULES = ("linear", "cosine", "constant")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.999, eps 1e-8), decay on 2-D weights only (not biases, LayerNorms); fused if possible."""
    parameters = list(model.parameters())
    groups = [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]
    options = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if device.type in ("cuda", "cpu"):
        with contextlib.suppress(RuntimeError, TypeError):
            # One kernel for the whole update instead of a chain of per-tensor ops.
            return torch.optim.AdamW(groups, fused=True, **options)
    return torch.optim.AdamW(groups, foreach=True, **options)


def lr_lambda(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the peak rate at each optimizer step (for LambdaLR)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}")
    decay_steps = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if name == "linear":
            return max(0.0, (total_steps - step) / decay_steps)
        if name == "cosine":
            progress = min((step - warmup_steps) / decay_steps, 1.0)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return 1.0  # constant

    return multiplier
