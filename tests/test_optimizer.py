"""gpt2kids.optimizer's schedules (`--schedule`, `--warmup-steps`): the multipliers of the peak rate, alone and
inside a real run (AdamW's weight decay: test_recipe.py).

The published model was trained with the Hugging Face Trainer, so its schedule functions
(`get_*_schedule_with_warmup`) are the reference, step by step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import config_for
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt2kids.optimizer import SCHEDULES, lr_lambda
from gpt2kids.training import prepare_run as build_trainer
from gpt2kids.training import run_epochs

PEAK = 1e-3


def hf_multipliers(name: str, warmup: int, total: int) -> list[float]:
    """transformers' multiplier for every step 0..total (the rate LambdaLR sets after each step)."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if name == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    elif name == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    return [scheduler.lr_lambdas[0](step) for step in range(total + 1)]


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("warmup, total", [(0, 1), (0, 17), (5, 40), (7, 8), (10, 10)])
def test_every_step_equals_transformers(name, warmup, total):
    ours = lr_lambda(name, warmup, total)
    # Both sides evaluate the same float formula, so they agree exactly.
    assert [ours(step) for step in range(total + 1)] == hf_multipliers(name, warmup, total)


def test_linear_rises_then_falls_to_exactly_zero_at_the_last_step():
    warmup, total = 4, 12
    f = lr_lambda("linear", warmup, total)
    assert [f(s) for s in range(warmup + 1)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # After the warm-up: equal steps down, 1/8 each, to exactly 0 once the last step is done.
    assert [f(s) for s in range(warmup, total + 1)] == [(total - s) / 8 for s in range(warmup, total + 1)]
    assert f(total) == 0.0 and f(total - 1) == 0.125
    # The published recipe: no warm-up, so the first step already runs at the peak rate.
    no_warmup = lr_lambda("linear", 0, total)
    assert no_warmup(0) == 1.0 and no_warmup(total) == 0.0 and no_warmup(total // 2) == 0.5


def test_cosine_is_half_way_down_at_mid_decay_and_zero_at_the_end():
    warmup, total = 6, 26
    f = lr_lambda("cosine", warmup, total)
    assert f(warmup) == 1.0
    assert f(warmup + (total - warmup) // 2) == pytest.approx(0.5, abs=1e-15)  # cos(pi/2) = 6e-17
    assert f(total) == 0.0
    # Not linear: a quarter of the way down the cosine is cos^2(pi/8) = 0.854, where linear gives 0.75.
    assert f(warmup + 5) == pytest.approx(math.cos(math.pi / 8) ** 2, rel=1e-12)
    values = [f(s) for s in range(warmup, total + 1)]
    assert values == sorted(values, reverse=True)


def test_constant_stays_at_the_peak_after_the_warm_up():
    f = lr_lambda("constant", 3, 50)
    assert [f(s) for s in range(6)] == [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    assert f(50) == 1.0 and f(49) == 1.0
    assert lr_lambda("constant", 0, 50)(0) == 1.0


def record_used_rates(trainer) -> list[float]:
    """The rate each optimizer step really ran with, read as the step is taken."""
    used: list[float] = []
    trainer.optimizer.register_step_pre_hook(lambda optimizer, *_: used.append(optimizer.param_groups[0]["lr"]))
    return used


def test_without_warm_up_the_first_step_uses_the_peak_rate(tmp_path, init_folder, corpus):
    trainer = build_trainer(config_for(init_folder, corpus, tmp_path / "run", lr=PEAK, max_steps=2))
    used = record_used_rates(trainer)
    run_epochs(trainer)
    total = trainer.total_steps
    assert used == [PEAK, PEAK * (total - 1) / total]


def test_a_run_logs_the_schedule_over_all_its_steps_even_when_max_steps_stops_it(tmp_path, init_folder, corpus):
    """train/lr in TensorBoard follows the schedule of epochs x steps per epoch, not of --max-steps."""
    out = tmp_path / "run"
    warmup, stop = 3, 9
    trainer = build_trainer(config_for(init_folder, corpus, out, lr=PEAK, schedule="cosine", warmup_steps=warmup,
                                       max_steps=stop))
    blocks = len(trainer.dataset.train)
    total = 2 * -(-blocks // 4)  # 2 epochs of ceil(blocks / batch 4) steps
    assert trainer.total_steps == total and total > 4 * stop
    used = record_used_rates(trainer)
    run_epochs(trainer)

    expected = [PEAK * m for m in hf_multipliers("cosine", warmup, total)]
    # Step s ran at the rate of multiplier s - 1 (the first at 0: the warm-up starts from nothing) ...
    assert used == expected[:stop]  # LambdaLR computes peak * multiplier, the same product
    events = EventAccumulator(str(out)).Reload().Scalars("train/lr")
    assert [event.step for event in events] == list(range(1, stop + 1))
    # ... and the value logged at step s is the rate set after it (multiplier s), as the HF Trainer logs it.
    # TensorBoard stores scalars as float32, so the expected values are rounded the same way.
    logged = [event.value for event in events]
    assert logged == [float(np.float32(rate)) for rate in expected[1:stop + 1]]
    assert logged[:warmup] == [float(np.float32(rate)) for rate in (PEAK / 3, 2 * PEAK / 3, PEAK)]
    # A schedule stretched over --max-steps instead would already be near its end here.
    assert logged[-1] > 0.9 * PEAK
