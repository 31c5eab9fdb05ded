"""The fine-tuning loop behind `python train.py`.

One optimizer step is `grad_accum` micro-batches of `batch_size` blocks on each process. Each
micro-batch's summed token loss is divided by the token count of the whole step (all micro-batches,
all processes), so any split of the same blocks gives the same update. The order of blocks is a
pure function of (seed, epoch), and checkpoints are taken between optimizer steps with every RNG
state, so `--resume` continues exactly where a run stopped. Read `optimizer_step`, then
`train_epoch`, then `train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shlex
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config
import torch.utils.deterministic
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gpt2kids import checkpoint, data, model_card, run_folder
from gpt2kids.atomic_files import atomic_write_text
from gpt2kids.config import GPT2Config, preset
from gpt2kids.decode_loop import generate
from gpt2kids.device import Precision, choose_precision, resolve_device
from gpt2kids.distributed import Distributed
from gpt2kids.errors import Stopped, UserError, say
from gpt2kids.hf import RUN_EXPORTS, export, load_model, load_tokenizer, run_export
from gpt2kids.logits_processors import SamplingSettings
from gpt2kids.loss import perplexity
from gpt2kids.memory_saving import use_memory_saving_kernels
from gpt2kids.model import GPT2, IGNORE_INDEX
from gpt2kids.optimizer import lr_lambda, make_optimizer
from gpt2kids.reporting import Reporter
from gpt2kids.tokenizer import Tokenizer
from gpt2kids.train_config import TrainConfig, check_block_size

SAMPLE_PROMPT = model_card.WIDGET_PROMPT  # the story TensorBoard shows after each evaluation starts here
# fp16 steps skipped in a row (the grad scaler backing off) before the run is declared diverged.
MAX_SKIPPED_STEPS = 25


class TrainingDiverged(UserError):
    """The loss or the gradients became non-finite and stayed so."""


@dataclass
class Progress:
    """Where the run is: saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch, from 0
    step_in_epoch: int = 0
    best_eval_loss: float | None = None
    last_eval: tuple[int, float] | None = None  # (step, eval loss) of the latest evaluation, for final/'s card
    evaluations_without_improvement: int = 0
    epoch_loss_sum: float = 0.0  # summed token loss of this epoch so far, for the epoch's train loss
    epoch_tokens: int = 0
    skipped_in_a_row: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    stopped_early: str | None = None  # why --early-stopping ended the run
    finished: bool = False
    best_at: tuple[int, int] | None = None  # (epoch, step) of best/'s weights, for its card


@dataclass
class StepResult:
    loss: float  # mean token loss of the step
    grad_norm: float  # before clipping
    target_tokens: int  # tokens that carried a loss (all processes)
    input_tokens: int  # tokens fed to the model (all processes)
    applied: bool  # False when the update was skipped (a non-finite loss or gradients)


@dataclass
class Run:
    """Everything a run works with, built once by `prepare_run` before the first step."""

    config: TrainConfig
    folder: Path
    model: GPT2  # the weights: saved, exported, evaluated
    forward: nn.Module  # what training steps call: the model, or its DDP wrapper
    tokenizer: Tokenizer
    dataset: data.Dataset
    plan: data.StepPlan
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: Precision
    device: torch.device
    dist: Distributed
    base_model: str  # what the run started from, as its model card names it: a hub id, a folder, "scratch (tiny)"
    reporter: Reporter | None = None
    progress: Progress = field(default_factory=Progress)
    stop_signal: signal.Signals | None = None
    seconds: Counter[str] = field(default_factory=Counter)  # this session's time by activity (see `timing`)

    @property
    def total_steps(self) -> int:
        return self.plan.steps_per_epoch * self.config.epochs

    @property
    def is_over(self) -> bool:
        """The run has done its epochs, or --early-stopping ended it."""
        return self.progress.epoch >= self.config.epochs or self.progress.stopped_early is not None


# --- one optimizer step --------------------------------------------------------------------------

def loss_normaliser(step_tokens: int, world_size: int) -> float:
    """What each process divides its summed loss by: DDP averages gradients over processes, so
    dividing by tokens / world_size turns that average into the gradient of the global mean."""
    return max(step_tokens, 1) / world_size


def on_device(run: Run, blocks: data.Blocks, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if len(indices) == 0:
        # A process with no blocks left in the last micro-batch still joins the gradient all-reduce,
        # with a block that carries no targets (zero loss, zero gradient).
        inputs, targets = blocks.inputs[:1], torch.full_like(blocks.targets[:1], IGNORE_INDEX)
    else:
        inputs, targets = blocks.inputs[indices], blocks.targets[indices]
    if run.device.type == "cuda":
        return (inputs.pin_memory().to(run.device, non_blocking=True),
                targets.pin_memory().to(run.device, non_blocking=True))
    return inputs.to(run.device), targets.to(run.device)


def backward(run: Run, micro_batches: list[torch.Tensor]) -> tuple[float, int]:
    """Accumulate in `.grad` the gradient of the step's mean token loss over micro-batches and processes;
    returns that loss and the step's count of target tokens."""
    blocks = run.dataset.train
    step_tokens = sum(int((blocks.targets[m] != IGNORE_INDEX).sum()) for m in micro_batches)
    normaliser = loss_normaliser(step_tokens, run.dist.world_size)
    loss_sum = torch.zeros((), device=run.device)
    for index, micro_batch in enumerate(micro_batches):
        inputs, targets = on_device(run, blocks, run.plan.rank_slice(micro_batch, run.dist.rank))
        # DDP all-reduces the gradients once, after the last micro-batch.
        accumulate = isinstance(run.forward, DistributedDataParallel) and index < len(micro_batches) - 1
        with run.forward.no_sync() if accumulate else contextlib.nullcontext():
            with run.precision.autocast(run.device):
                loss = run.forward(inputs, targets, reduction="sum")
            run.scaler.scale(loss / normaliser).backward()
        loss_sum += loss.detach()
    return float(run.dist.sum(loss_sum)) / max(step_tokens, 1), step_tokens


def optimizer_step(run: Run, micro_batches: list[torch.Tensor]) -> StepResult:
    """Forward and backward over the step's micro-batches, then clip and update."""
    loss, step_tokens = backward(run, micro_batches)
    run.scaler.unscale_(run.optimizer)
    max_norm = run.config.max_grad_norm if run.config.max_grad_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm))
    applied = math.isfinite(grad_norm) and math.isfinite(loss)
    if applied:
        # The scheduler moves only with the optimizer, so the two never drift apart.
        run.scaler.step(run.optimizer)
        run.scheduler.step()
    run.scaler.update()  # fp16: lowers the scale after non-finite gradients; a no-op otherwise
    run.optimizer.zero_grad(set_to_none=True)
    input_tokens = sum(len(m) for m in micro_batches) * run.dataset.train.inputs.shape[1]
    return StepResult(loss, grad_norm, step_tokens, input_tokens, applied)


# --- evaluation ----------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(run: Run) -> float | None:
    """Mean token cross-entropy over the held-out blocks (all processes together)."""
    blocks = run.dataset.eval
    if blocks is None:
        return None
    run.model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)
    mine = torch.arange(run.dist.rank, len(blocks), run.dist.world_size)
    for start in range(0, len(mine), run.config.batch_size):
        inputs, targets = on_device(run, blocks, mine[start:start + run.config.batch_size])
        with run.precision.autocast(run.device):
            totals[0] += run.model(inputs, targets, reduction="sum").double()
        totals[1] += (targets != IGNORE_INDEX).sum()
    run.dist.sum(totals)
    run.model.train()
    return float(totals[0] / totals[1]) if totals[1] > 0 else None


def sample_story(run: Run) -> str:
    """A short story from a fixed prompt, for TensorBoard; its own generator leaves the training RNG alone."""
    settings = SamplingSettings(max_new_tokens=60, top_k=50, repetition_penalty=1.2)
    generator = torch.Generator(device=run.device).manual_seed(run.config.seed)
    run.model.eval()
    with torch.no_grad(), run.precision.autocast(run.device):
        prompt = run.tokenizer.encode(SAMPLE_PROMPT)
        [tokens] = generate(run.model, [prompt], settings, run.tokenizer.eos_id, generator)
    run.model.train()
    return SAMPLE_PROMPT + run.tokenizer.decode(tokens)


def evaluate_and_keep_best(run: Run, end_of_epoch_row: dict[str, Any] | None = None) -> float | None:
    """Evaluate, log, and export `best/` on a new lowest eval loss."""
    progress = run.progress
    with timing(run, "evaluating"):
        eval_loss = evaluate(run)
    if end_of_epoch_row is not None:  # into the history before the export, so best/'s card holds it
        end_of_epoch_row["eval_loss"] = eval_loss
        end_of_epoch_row["perplexity"] = perplexity(eval_loss) if eval_loss is not None else None
        progress.history.append(end_of_epoch_row)
    if eval_loss is None:
        return None
    progress.last_eval = (progress.step, eval_loss)
    run.reporter.scalars({"eval/loss": eval_loss, "eval/perplexity": perplexity(eval_loss)}, progress.step)
    if run.dist.is_main:
        with timing(run, "evaluating"):
            story = sample_story(run)
        run.reporter.text("sample", story, progress.step)
    best = progress.best_eval_loss
    # A non-finite loss is never best; a NaN best (kept by older versions) is beaten by any finite one.
    if math.isfinite(eval_loss) and (best is None or math.isnan(best) or eval_loss < best):
        progress.best_eval_loss = eval_loss
        progress.evaluations_without_improvement = 0
        progress.best_at = (shown_epoch(progress), progress.step)
        save_export(run, "best")
    else:
        progress.evaluations_without_improvement += 1
    return eval_loss


# --- checkpoints and exports ---------------------------------------------------------------------

def training_state(run: Run, rng_by_rank: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng_by_rank": rng_by_rank,
        "world_size": run.dist.world_size,  # the block order and the schedule's length depend on it
        "corpus": run.dataset.digest,  # so are the split, the blocks and their order on the stories
        "progress": dataclasses.asdict(run.progress),
        "model_config": run.model.config.to_hf_dict(),
        "tokenizer": run.tokenizer.backend.to_str(),
        "tokenizer_special_tokens": run.tokenizer.special_tokens,
        "tokenizer_eos_id": run.tokenizer.eos_id,
    }


def restore(run: Run, saved: checkpoint.Checkpoint) -> None:
    try:
        run.model.load_untied_state_dict(saved.model)
    except ValueError:
        raise UserError(f"the checkpoint in {saved.folder} does not fit the model; it cannot be resumed") from None
    run.optimizer.load_state_dict(saved.state["optimizer"])
    run.scheduler.load_state_dict(saved.state["scheduler"])
    if saved.state["scaler"]:
        run.scaler.load_state_dict(saved.state["scaler"])
    # Each process's own RNG states: their dropout draws part ways where an epoch's last micro-batch is split
    # unevenly. Checkpoints from before they were kept per process, or from another process count, hold one.
    states = saved.state.get("rng_by_rank") or [saved.state["rng"]]
    checkpoint.restore_rng_states(states[run.dist.rank] if len(states) == run.dist.world_size else states[0])
    run.progress = Progress(**saved.progress)


def save_checkpoint(run: Run) -> None:
    with timing(run, "saving"):
        rng_by_rank = run.dist.gather(checkpoint.rng_states())
        if run.dist.is_main:
            checkpoint.save(run.folder, run.model, training_state(run, rng_by_rank))
        run.dist.barrier()


def save_export(run: Run, which: str) -> None:
    with timing(run, "saving"):
        if run.dist.is_main:
            export(run.model, run.tokenizer, run.folder / which, card_files=card_files_for(run, which))
        run.dist.barrier()


@contextlib.contextmanager
def timing(run: Run, activity: str) -> Iterator[None]:
    """Add the block's wall time to `run.seconds[activity]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        run.seconds[activity] += time.perf_counter() - start


def shown_epoch(progress: Progress) -> int:
    """The epoch a step belongs to, from 1 (a step at an epoch's end belongs to that epoch)."""
    return progress.epoch + 1 if progress.step_in_epoch else progress.epoch


def card_files_for(run: Run, which: str) -> dict[str, str]:
    """The card files of a run's `final/` export at the run's current step, or of `best/` at its step."""
    config, dataset, progress = run.config, run.dataset, run.progress
    epoch, step = shown_epoch(progress), progress.step
    if which == "best" and progress.best_at is not None:  # older checkpoints: not recorded (best/ is at this step)
        epoch, step = progress.best_at
    # Local paths by their names only: the card is meant for the hub.
    data_name = Path(config.data).name if config.data else "the bundled gpt2kids Indonesian children's stories"
    (beta1, beta2), eps = run.optimizer.defaults["betas"], run.optimizer.defaults["eps"]  # what it runs with
    hyperparameters = {
        "base model": model_card.base_model_shown(run.base_model), "epochs": config.epochs,
        "micro-batch": config.batch_size, "gradient accumulation": config.grad_accum,
        "GPUs/processes": run.dist.world_size, "block size": dataset.train.inputs.shape[1], "learning rate": config.lr,
        "schedule": f"{config.schedule}, {config.warmup_steps} warm-up steps",
        "optimizer": f"AdamW (betas {beta1}, {beta2}, eps {eps:g})", "weight decay": config.weight_decay,
        "max grad norm": config.max_grad_norm, "precision": run.precision.name, "seed": config.seed,
        "dropout": run.model.config.resid_pdrop,
    }
    description = (f"{data_name}: {dataset.train_story_count} training stories ({dataset.train_bytes:,} bytes, "
                   f"{dataset.train_tokens:,} tokens), {dataset.eval_story_count} held out")
    # final/'s eval loss: the latest evaluation's, when it evaluated the weights of this step (within an epoch too).
    final_eval = progress.last_eval[1] if progress.last_eval and progress.last_eval[0] == progress.step else None
    stopped = progress.stopped_early
    if stopped is None and which == "final" and progress.step < run.total_steps:
        stopped = f"--max-steps {config.max_steps}"
    facts = model_card.CardFacts(
        title=f"gpt2kids: {run.folder.name} ({which})", base_model=run.base_model, data_description=description,
        hyperparameters=hyperparameters, history=[row for row in progress.history if row["step"] <= step],
        export=which, epoch=epoch, step=step,
        total_steps=run.total_steps, stopped_early=stopped,
        eval_loss=progress.best_eval_loss if which == "best" else final_eval,
        model_id=config.push_to_hub,
        **({"dataset_name": Path(config.eval_data or config.data).name} if config.eval_data or config.data else {}))
    return model_card.card_files(facts)


# --- one epoch -----------------------------------------------------------------------------------

def check_diverged(run: Run, result: StepResult) -> None:
    progress = run.progress
    progress.skipped_in_a_row = 0 if result.applied else progress.skipped_in_a_row + 1
    # fp16: after a skipped step the scaler lowers its scale and the next step usually succeeds.
    give_up_after = MAX_SKIPPED_STEPS if run.precision.needs_grad_scaler else 1
    if progress.skipped_in_a_row >= give_up_after:
        saved = checkpoint.newest_folder(run.folder)
        exports = exports_in(run.folder)
        kept = f"{saved}/ holds the last good state" if saved else "no checkpoint was saved yet"
        if exports:
            kept += f", and {' and '.join(exports)} " + ("is as it was" if len(exports) == 1 else "are as they were")
        fix = "lower --lr" if run.precision.name == "fp32" else "lower --lr or use --precision fp32"
        raise TrainingDiverged(f"the loss became non-finite at step {progress.step} (loss {result.loss}, grad norm "
                               f"{result.grad_norm}); the run stopped: {kept}; {fix}")


def train_epoch(run: Run) -> bool:
    """Train to the end of the current epoch; True when the run must stop here (--max-steps)."""
    config, progress, plan = run.config, run.progress, run.plan
    order = data.epoch_order(len(run.dataset.train), config.seed, progress.epoch)
    started = time.perf_counter()
    description = f"epoch {progress.epoch + 1}/{config.epochs}"
    stop = at_limit = False
    with run.reporter.progress_bar(description, plan.steps_per_epoch, progress.step_in_epoch) as bar:
        while progress.step_in_epoch < plan.steps_per_epoch:
            step_started = time.perf_counter()
            result = optimizer_step(run, plan.step_blocks(order, progress.step_in_epoch))  # ends in a host sync
            step_seconds = time.perf_counter() - step_started
            run.seconds["steps"] += step_seconds
            tokens_per_s = result.input_tokens / max(step_seconds, 1e-9)
            progress.step += 1
            progress.step_in_epoch += 1
            check_diverged(run, result)
            if result.applied:
                progress.epoch_loss_sum += result.loss * result.target_tokens
                progress.epoch_tokens += result.target_tokens
            lr = run.optimizer.param_groups[0]["lr"]
            run.reporter.scalars({"train/loss": result.loss, "train/lr": lr, "train/grad_norm": result.grad_norm,
                                  "train/tokens_per_s": tokens_per_s}, progress.step)
            bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
            bar.update(1)

            stop = run.dist.any(run.stop_signal is not None, run.device)
            at_limit = config.max_steps is not None and progress.step >= config.max_steps
            if progress.step_in_epoch < plan.steps_per_epoch:  # at the end, finish_epoch evaluates and saves
                if config.eval_every and progress.step % config.eval_every == 0:
                    evaluate_and_keep_best(run)
                    check_early_stopping(run)
                if run.is_over:  # stopped early: the run's end exports final/, then checkpoints
                    break
                if stop or at_limit or (config.save_every and progress.step % config.save_every == 0):
                    save_checkpoint(run)
            if stop or at_limit:
                break
    if progress.step_in_epoch == plan.steps_per_epoch:
        finish_epoch(run, time.perf_counter() - started)
    if stop and not run.is_over:  # a signal in the run's last step (or its early stop): the run ends anyway
        received = run.stop_signal or signal.SIGTERM  # on another process: torchrun passes SIGTERM/SIGINT on
        resume = run_folder.resume_command(run.folder, run.dist.world_size)
        raise Stopped(f"stopped by {received.name} at step {progress.step}; a checkpoint is saved; "
                      f"continue with: {resume}", 128 + int(received))
    return at_limit


def finish_epoch(run: Run, seconds: float) -> None:
    progress = run.progress
    train_loss = progress.epoch_loss_sum / max(progress.epoch_tokens, 1)
    row = {"epoch": progress.epoch + 1, "step": progress.step, "train_loss": train_loss}
    eval_loss = evaluate_and_keep_best(run, end_of_epoch_row=row)
    summary = f"epoch {row['epoch']}/{run.config.epochs}: train loss {train_loss:.4f}"
    if eval_loss is not None:
        summary += f", eval loss {eval_loss:.4f}, perplexity {row['perplexity']:.2f}"
    say(f"{summary} ({seconds:.0f} s, step {progress.step})")
    progress.epoch += 1
    progress.step_in_epoch = 0
    progress.epoch_loss_sum, progress.epoch_tokens = 0.0, 0
    check_early_stopping(run)
    if run.is_over:
        finish_run(run)  # final/ now, so that this checkpoint is the run's last
    # The exports come first: a kill between them and this checkpoint replays the epoch's tail.
    save_checkpoint(run)


def check_early_stopping(run: Run) -> None:
    """--early-stopping N: after N evaluations in a row with no new lowest eval loss, the run is over."""
    progress, patience = run.progress, run.config.early_stopping
    if patience and progress.evaluations_without_improvement >= patience:
        count, best = progress.evaluations_without_improvement, progress.best_eval_loss
        brought = f"no eval loss below {best:.4f}" if best is not None else "no finite eval loss"
        progress.stopped_early = (f"{count} evaluation{'s' if count > 1 else ''} in a row brought {brought} "
                                  f"(--early-stopping {patience})")


def finish_run(run: Run) -> None:
    """Export final/ (after --max-steps too: a smoke run still leaves a usable model); a run that is over
    is marked finished, which its next checkpoint records. After an early stop best/'s card says so too."""
    run.progress.finished = run.is_over
    save_export(run, "final")
    progress = run.progress
    if progress.stopped_early and progress.best_at is not None and (run.folder / "best").is_dir():
        with timing(run, "saving"):
            if run.dist.is_main:  # the card only: best/'s weights stay as they were
                for name, text in card_files_for(run, "best").items():
                    atomic_write_text(run.folder / "best" / name, text)
            run.dist.barrier()


@contextlib.contextmanager
def stop_on_signals(run: Run) -> Iterator[None]:
    """Ctrl-C and SIGTERM finish the current step, then save a checkpoint and stop."""

    def request_stop(number: int, _frame: object) -> None:
        run.stop_signal = signal.Signals(number)
        signal.signal(number, previous[number])  # first: a second signal, even one during the line below, aborts
        say(f"\n{run.stop_signal.name} received: stopping after this step and saving a checkpoint "  # torchrun
            "(send it again to abort without saving)")  # passes the signal to every process; rank 0 says so

    # A signal the shell made us ignore (a script's background job) stays ignored.
    numbers = [number for number in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(number) is not signal.SIG_IGN]
    previous = {number: signal.getsignal(number) for number in numbers}
    for number in numbers:
        signal.signal(number, request_stop)
    try:
        yield
    finally:
        for number in numbers:
            signal.signal(number, previous[number])


# --- the run -------------------------------------------------------------------------------------

def train(config: TrainConfig) -> Progress:
    """Run (or resume) a training run; returns its final progress."""
    config.validate()
    dist = Distributed.from_environment(config.device)
    try:
        with compiler_switches_kept():
            return run_epochs(prepare_run(config, dist))
    finally:
        dist.close()


@contextlib.contextmanager
def compiler_switches_kept() -> Iterator[None]:
    """Puts back torch's process-wide switches that `compile_for_training` turns on, when the run ends."""
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill, fallback_random = torch.utils.deterministic.fill_uninitialized_memory, torch._inductor.config.fallback_random
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch._inductor.config.fallback_random = fallback_random


def run_epochs(run: Run) -> Progress:
    progress = run.progress
    started = time.perf_counter()
    run.model.train()
    limit = run.config.max_steps
    if limit is not None and progress.step >= limit:  # a resume that asks for no more steps: nothing to write
        say(f"{run.folder} is at step {progress.step}, at or past --max-steps {limit}: nothing to train; resume "
            "with a higher --max-steps, or without it, to go on")
        return progress
    run.reporter = Reporter(run.folder, run.dist.is_main, progress.step, dataclasses.asdict(run.config),
                            resumed=run.config.resume)
    status = None  # TensorBoard's status of the run: none for a session that stops to be resumed
    try:
        with stop_on_signals(run):
            while not run.is_over:
                if train_epoch(run):  # --max-steps
                    break
        if not progress.finished:  # --max-steps, or a checkpoint taken after the last epoch but before final/
            finish_run(run)
            if progress.finished:
                save_checkpoint(run)
        status = "STATUS_SUCCESS" if progress.finished else None
    except TrainingDiverged:
        status = "STATUS_FAILURE"
        raise
    finally:
        run.reporter.close(status)
    if progress.stopped_early:
        say(f"stopped early: {progress.stopped_early}")
    if progress.finished and run.config.drop_resume_state and run.dist.is_main:
        run_folder.drop_resume_state(run.folder)
    report_where_things_are(run, time.perf_counter() - started)
    if not progress.finished:  # --max-steps: the run goes on from its checkpoint
        say(f"stopped at --max-steps {run.config.max_steps} (step {progress.step} of {run.total_steps}); continue "
            f"with: {run_folder.resume_command(run.folder, run.dist.world_size)}")
    if progress.finished and run.config.push_to_hub and run.dist.is_main:
        push_export(run)
    elif run.config.push_to_hub and not progress.finished:  # --max-steps ended this session before the run's end
        resume = run_folder.resume_command(run.folder, run.dist.world_size)
        say(f"not pushed to {run.config.push_to_hub}: the run is not finished (step {progress.step} of "
            f"{run.total_steps}); finish it with {resume}, or push "
            f"what it has with python -m gpt2kids.push {shlex.quote(str(run.folder))} {run.config.push_to_hub}")
    return progress


def exports_in(folder: Path) -> list[str]:
    """The run's exports that exist, as "FOLDER/best/" and "FOLDER/final/"."""
    return [f"{folder / name}/" for name in RUN_EXPORTS if (folder / name).is_dir()]


def report_where_things_are(run: Run, seconds: float) -> None:
    if not run.dist.is_main:
        return  # only the main process reports (and walks the run folder for its size)
    folder = run.folder
    exports = exports_in(folder)
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    say(f"exports: {', '.join(exports)}; the run folder holds {run_folder.human_size(size)}")
    spent = run.seconds
    say(f"time: the loop took {seconds:.1f} s: {spent['steps']:.1f} s in optimizer steps, "
        f"{spent['evaluating']:.1f} s evaluating, {spent['saving']:.1f} s writing checkpoints and exports")
    export = run_export(folder) or folder  # named outright: what the run folder alone would mean
    say(f"generate: python generate.py --model {shlex.quote(str(export))} \"{SAMPLE_PROMPT}\"")
    say(f"watch:    tensorboard --logdir {shlex.quote(str(folder))}")


def push_export(run: Run) -> None:
    from gpt2kids import push

    try:
        which = push.export_folder(run.folder)  # best/, else final/
        url = push.push_export(which, run.config.push_to_hub, private=run.config.private)
    except UserError as error:
        raise UserError(f"{error}; the run is saved: retry with python -m gpt2kids.push {shlex.quote(str(run.folder))} "
                        f"{run.config.push_to_hub}") from None
    say(f"pushed {which} to {url}")


# --- before the first step -----------------------------------------------------------------------

def build_model_and_tokenizer(config: TrainConfig, train_stories: list[str]) -> tuple[GPT2, Tokenizer]:
    """The model to fine-tune (or train from scratch) and its tokenizer."""
    if config.init == "scratch":
        if config.tokenizer:
            tokenizer = Tokenizer.from_path(config.tokenizer)
        else:
            say(f"training a byte-level BPE of up to {config.vocab_size} tokens on the training stories")
            tokenizer = Tokenizer.train(train_stories, config.vocab_size)  # the same on every process
            note = " (a small corpus runs out of merges sooner)" if tokenizer.vocab_size < config.vocab_size else ""
            say(f"the BPE has {tokenizer.vocab_size} tokens{note}")
        model_config = preset(config.model_size, tokenizer.vocab_size, tokenizer.eos_id)
        if config.dropout is not None:
            model_config = model_config.with_dropout(config.dropout)
        return GPT2(model_config), tokenizer
    model, folder = load_model(config.init, dropout=config.dropout)
    tokenizer = Tokenizer.from_path(config.tokenizer) if config.tokenizer else load_tokenizer(folder)
    return model, tokenizer


def checkpoint_to_resume(folder: Path, dist: Distributed) -> checkpoint.Checkpoint | None:
    """The run's newest good checkpoint (None: it has none yet); a damaged newer one is moved aside, so that the
    next checkpoint keeps the good one as its previous."""
    saved = checkpoint.load_latest_good(folder) if checkpoint.exists(folder) else None
    if saved is None:
        say(f"{folder} holds no checkpoint yet (the run stopped before its first one): starting it again from "
            "step 0 with its saved settings")
        return None
    processes = saved.state.get("world_size")  # older checkpoints: not recorded
    if processes is not None and processes != dist.world_size:
        raise UserError(f"the run in {folder} was trained by {processes} process(es) and this is {dist.world_size}; "
                        f"resume it with the same count (torchrun --nproc_per_node={processes}, or plain python for "
                        "1): the order of its blocks and its schedule depend on it")
    dist.barrier()  # every process has read the checkpoint before a damaged one is moved aside
    if saved.folder != folder / checkpoint.CHECKPOINT and dist.is_main and (folder / checkpoint.CHECKPOINT).exists():
        checkpoint.set_aside_damaged(folder)
        say(f"moved the damaged {folder / checkpoint.CHECKPOINT} to {folder / checkpoint.DAMAGED}, so that "
            f"the next checkpoint keeps {saved.folder} as the previous one")
    return saved


def compile_for_training(model: GPT2, device: torch.device) -> None:
    """torch.compile `model` in place (its state dict's names stay the same), with the process-wide switches an
    exact --resume needs: `train` puts them back when the run ends (compiler_switches_kept)."""
    # Random ops (dropout) drawn as eager PyTorch draws them, from the checkpointed generator:
    # inductor's own RNG would not replay exactly after --resume.
    torch._inductor.config.fallback_random = True
    if device.type == "cpu":
        # Inductor's CPU kernels add into the embedding's gradient with atomics, in whatever order the
        # threads arrive: two identical compiled runs would differ in the last bits. Deterministic
        # algorithms make it lower that sum to the ordered kernel; warn_only keeps ops without a
        # deterministic version running, and uninitialised memory is not filled (no cost). Not on a
        # GPU: there it would move other kernels to slower deterministic versions and warn about
        # cuBLAS's workspace setting, for an exactness no GPU run has checked.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    model.compile()


def prepare_run(config: TrainConfig, dist: Distributed | None = None) -> Run:
    """Everything before the first step: run folder, data, model, optimizer; restored on --resume."""
    dist = dist or Distributed()
    config, folder = run_folder.prepare(config, dist)
    if config.push_to_hub and dist.is_main:  # said before any loading, not after the last epoch
        from gpt2kids.push import check_can_push, check_token_can_write

        check_token_can_write(check_can_push(config.push_to_hub))  # no token, offline; a bad token, no network
    device = resolve_device(dist.device_name(config.device))
    precision = choose_precision(config.precision, device)
    torch.manual_seed(config.seed)
    train_stories, eval_stories = data.load_split(config.data or data.BUNDLED_STORIES, config.eval_data,
                                                  config.eval_split, config.seed)
    saved = checkpoint_to_resume(folder, dist) if config.resume else None
    if saved is not None:
        model = GPT2(GPT2Config.from_hf_dict(saved.state["model_config"]))
        tokenizer = Tokenizer.from_json_string(saved.state["tokenizer"], saved.state.get("tokenizer_special_tokens"),
                                               saved.state.get("tokenizer_eos_id"))
    else:
        model, tokenizer = build_model_and_tokenizer(config, train_stories)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has only "
                        f"{model.config.vocab_size}; use the model's own tokenizer or a smaller one")
    block_size = config.block_size or min(data.DEFAULT_BLOCK_SIZE, model.config.n_positions)
    check_block_size(block_size, model.config.n_positions)
    config.block_size = block_size
    dataset = data.build_dataset(train_stories, eval_stories, tokenizer, block_size)
    if saved is not None and saved.state.get("corpus", dataset.digest) != dataset.digest:  # older: not recorded
        raise UserError(f"the stories of the run in {folder} changed since it started (its training and held-out "
                        "sets differ now), so its split and blocks would too; put them back as they were to "
                        "resume, or start a new run with another --out")
    if dist.is_main and not config.resume:
        run_folder.write_settings(folder, config)  # the run folder appears only now, every input checked
    dist.barrier()

    model = use_memory_saving_kernels(model.to(device))
    if config.compile:
        compile_for_training(model, device)
    forward: nn.Module = model
    if dist.enabled:
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    plan = data.StepPlan(len(dataset.train), config.batch_size, config.grad_accum, dist.world_size)
    optimizer = make_optimizer(model, config.lr, config.weight_decay, device)
    schedule = lr_lambda(config.schedule, config.warmup_steps, plan.steps_per_epoch * config.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_grad_scaler)
    base_model = f"scratch ({config.model_size})" if config.init == "scratch" else config.init
    run = Run(config, folder, model, forward, tokenizer, dataset, plan, optimizer, scheduler, scaler, precision,
              device, dist, base_model)
    if saved is not None:
        restore(run, saved)
        if run.progress.finished:
            raise UserError(f"the run in {folder} has already finished; nothing to resume")
        say(f"resuming {folder} at step {run.progress.step} (epoch {run.progress.epoch + 1})")
    say(f"{folder}: {model.num_parameters():,} parameters on {device} ({precision.name}), "
        f"{len(dataset.train)} training blocks of {block_size} tokens, {plan.steps_per_epoch} steps "
        f"per epoch, {run.total_steps} in all")
    return run
