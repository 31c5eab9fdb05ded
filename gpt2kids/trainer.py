"""The fine-tuning loop behind `python train.py`.

One optimizer step is `grad_accum` micro-batches of `batch_size` blocks on each rank. The loss of
every micro-batch is its summed token cross-entropy divided by the token count of the whole step
(all micro-batches, all ranks), so any split of the same blocks gives the same update. The order
of blocks is a pure function of (seed, epoch) and checkpoints are taken between optimizer steps
together with every RNG state, so `--resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gpt2kids import checkpoint, data, model_card
from gpt2kids.config import GPT2Config, preset
from gpt2kids.device import Precision, choose_precision, resolve_device
from gpt2kids.distributed import Distributed
from gpt2kids.errors import Stopped, UserError
from gpt2kids.hf import export, load_model, load_tokenizer
from gpt2kids.io import atomic_write_text, check_writable, describe_os_error, recover_folder, remove_debris
from gpt2kids.model import GPT2
from gpt2kids.schedule import SCHEDULES, lr_lambda
from gpt2kids.tokenizer import Tokenizer

DEFAULT_INIT = "flax-community/gpt2-small-indonesian"
TRAIN_CONFIG = "train_config.json"
SAMPLE_PROMPT = "Archie sedang mengendarai roket ke planet Mars."
# fp16 steps skipped in a row (the grad scaler backing off) before the run is declared diverged.
MAX_SKIPPED_STEPS = 25
# Settings of one invocation rather than of the run: a resumed run takes these from the command line.
SESSION_FIELDS = ("out", "resume", "max_steps", "device", "compile")


class TrainingDiverged(UserError):
    """The loss or the gradients became non-finite and stayed so."""


@dataclass
class TrainConfig:
    data: str | None = None  # None: the bundled stories
    init: str = DEFAULT_INIT
    model_size: str = "small"
    tokenizer: str | None = None
    vocab_size: int = 8000
    out: str | None = None
    epochs: int = 10
    batch_size: int = 8
    grad_accum: int = 1
    block_size: int | None = None
    lr: float = 5e-5
    schedule: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_split: float = 0.1
    eval_data: str | None = None
    eval_every: int | None = None
    save_every: int | None = None
    precision: str = "auto"
    device: str = "auto"
    compile: bool = False
    seed: int = 42
    resume: bool = False
    max_steps: int | None = None
    dropout: float | None = None  # None: the dropout of the init checkpoint's config

    def validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")

        for name in ("epochs", "batch_size", "grad_accum", "block_size", "lr", "eval_every", "save_every",
                     "max_steps", "vocab_size"):
            positive(name)
        for name in ("warmup_steps", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if value < 0 or not math.isfinite(value):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if not math.isfinite(self.lr):
            raise UserError(f"--lr must be finite, got {self.lr}")
        if not 0.0 <= self.eval_split < 1.0:
            raise UserError(f"--eval-split must be in [0, 1), got {self.eval_split}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


@dataclass
class Progress:
    """Where the run is: saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch, from 0
    step_in_epoch: int = 0
    best_eval_loss: float | None = None
    epoch_loss_sum: float = 0.0  # summed token loss of this epoch so far, for the epoch's train loss
    epoch_tokens: int = 0
    skipped_in_a_row: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


# --- set-up --------------------------------------------------------------------------------------

def prepare_run_folder(config: TrainConfig, dist: Distributed) -> tuple[TrainConfig, Path]:
    """Resolve `--out`, refuse to overwrite a run, and on `--resume` restore the run's own settings."""
    name = dist.broadcast(datetime.now().strftime("%Y%m%d-%H%M%S"))
    out = Path(config.out) if config.out else Path("runs") / name
    has_run = (out / TRAIN_CONFIG).is_file() or checkpoint.exists(out)
    if config.resume:
        if not has_run:
            raise UserError(f"nothing to resume in {out}: it holds no run; drop --resume to start a new run")
        try:
            saved = json.loads((out / TRAIN_CONFIG).read_text())
            known = {f.name for f in dataclasses.fields(TrainConfig)}
            restored = TrainConfig(**{k: v for k, v in saved.items() if k in known})
        except (OSError, ValueError, TypeError) as error:
            raise UserError(f"{out / TRAIN_CONFIG} cannot be read ({error}); the run cannot be resumed") from None
        for name in SESSION_FIELDS:
            setattr(restored, name, getattr(config, name))
        restored.out = str(out)
        restored.validate()
        config = restored
    elif has_run:
        raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if dist.is_main:
        check_writable(out)
        if out.is_dir():  # what a killed run may have left half-done
            remove_debris(out)
            for export_name in ("best", "final"):
                recover_folder(out / export_name)
    return config, out


def build_model_and_tokenizer(config: TrainConfig, train_stories: list[str]) -> tuple[GPT2, Tokenizer, str]:
    """The model to fine-tune (or train from scratch) and its tokenizer; also names the base model."""
    if config.init == "scratch":
        if config.tokenizer:
            tokenizer = Tokenizer.from_path(config.tokenizer)
        else:
            print(f"training a {config.vocab_size}-token byte-level BPE on the training stories", file=sys.stderr)
            tokenizer = Tokenizer.train(train_stories, config.vocab_size)
        model_config = preset(config.model_size, tokenizer.vocab_size, tokenizer.eos_id)
        if config.dropout is not None:
            model_config = model_config.with_dropout(config.dropout)
        return GPT2(model_config), tokenizer, f"scratch ({config.model_size})"
    model, folder = load_model(config.init)
    tokenizer = Tokenizer.from_path(config.tokenizer) if config.tokenizer else load_tokenizer(folder)
    if config.dropout is not None:
        fresh = GPT2(model.config.with_dropout(config.dropout))
        fresh.load_state_dict(model.state_dict())
        model = fresh
    return model, tokenizer, config.init


def check_tokenizer_fits(tokenizer: Tokenizer, model_config: GPT2Config) -> None:
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has only "
                        f"{model_config.vocab_size}; use the model's own tokenizer or a smaller one")


def make_optimizer(model: GPT2, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights only (not biases, LayerNorms); fused where possible."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    options = dict(lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    if device.type in ("cuda", "cpu"):
        with contextlib.suppress(RuntimeError, TypeError):
            # One kernel for the whole update instead of a chain of per-tensor ops.
            return torch.optim.AdamW(groups, fused=True, **options)
    return torch.optim.AdamW(groups, foreach=True, **options)


# --- the loop ------------------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float  # mean token loss of the step
    grad_norm: float
    tokens: int  # input tokens processed (all ranks)
    applied: bool  # False when the update was skipped (non-finite gradients under fp16)


class Trainer:
    def __init__(self, config: TrainConfig, model: GPT2, tokenizer: Tokenizer, dataset: data.Dataset,
                 run_dir: Path, device: torch.device, precision: Precision, dist: Distributed,
                 base_model: str) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.run_dir = run_dir
        self.device = device
        self.precision = precision
        self.dist = dist
        self.base_model = base_model
        self.plan = data.StepPlan(len(dataset.train), config.batch_size, config.grad_accum, dist.world_size)
        self.total_steps = self.plan.steps_per_epoch * config.epochs
        self.optimizer = make_optimizer(model, config, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.schedule, config.warmup_steps, self.total_steps))
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_grad_scaler)
        self.progress = Progress()
        wrapped: torch.nn.Module = model
        if dist.enabled:
            wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward_model = torch.compile(wrapped) if config.compile else wrapped
        self.ddp = wrapped if dist.enabled else None
        self.stop_signal: signal.Signals | None = None
        self.writer = None

    # --- state ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_states(),
            "progress": dataclasses.asdict(self.progress),
            "model_config": self.model.config.to_hf_dict(),
            "tokenizer": self.tokenizer.backend.to_str(),
        }

    def restore(self, saved: checkpoint.Checkpoint) -> None:
        result = self.model.load_state_dict(saved.model, strict=False)
        if result.unexpected_keys or set(result.missing_keys) != {"lm_head.weight"}:
            raise UserError(f"the checkpoint in {saved.folder} does not fit the model; it cannot be resumed")
        self.optimizer.load_state_dict(saved.state["optimizer"])
        self.scheduler.load_state_dict(saved.state["scheduler"])
        if saved.state["scaler"]:
            self.scaler.load_state_dict(saved.state["scaler"])
        checkpoint.restore_rng_states(saved.state["rng"])
        self.progress = Progress(**saved.progress)

    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            checkpoint.save(self.run_dir, self.model, self.state())
        self.dist.barrier()

    # --- one optimizer step --------------------------------------------------------------------

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self.dataset.train
        if len(indices) == 0:
            # A rank with no blocks left in the last micro-batch still joins the gradient all-reduce,
            # with a block that carries no targets (zero loss, zero gradient).
            return (blocks.inputs[:1].to(self.device),
                    torch.full_like(blocks.targets[:1], data.IGNORE_INDEX).to(self.device))
        inputs, targets = blocks.inputs[indices], blocks.targets[indices]
        if self.device.type == "cuda":
            return (inputs.pin_memory().to(self.device, non_blocking=True),
                    targets.pin_memory().to(self.device, non_blocking=True))
        return inputs.to(self.device), targets.to(self.device)

    def train_step(self, micro_batches: list[torch.Tensor]) -> StepResult:
        """Forward and backward over the step's micro-batches, then clip and update."""
        blocks = self.dataset.train
        step_tokens = sum(int((blocks.targets[m] != data.IGNORE_INDEX).sum()) for m in micro_batches)
        # DDP averages gradients over ranks; multiplying by world_size turns that into a global sum.
        normaliser = max(step_tokens, 1) / self.dist.world_size
        loss_sum = torch.zeros((), device=self.device)
        input_tokens = 0
        for index, micro_batch in enumerate(micro_batches):
            inputs, targets = self.batch(self.plan.rank_slice(micro_batch, self.dist.rank))
            input_tokens += int((targets != data.IGNORE_INDEX).sum())
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync:
                with self.precision.autocast(self.device):
                    loss = self.forward_model(inputs, targets, reduction="sum")
                self.scaler.scale(loss / normaliser).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        mean_loss = float(self.dist.sum(loss_sum)) / max(step_tokens, 1)
        finite = math.isfinite(grad_norm) and math.isfinite(mean_loss)
        if self.precision.needs_grad_scaler:
            self.scaler.step(self.optimizer)  # skips the update itself when gradients are not finite
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        if finite:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(mean_loss, grad_norm, step_tokens, finite)

    # --- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token cross-entropy over the held-out blocks (all ranks together)."""
        blocks = self.dataset.eval
        if blocks is None:
            return None
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        mine = torch.arange(self.dist.rank, len(blocks), self.dist.world_size)
        for start in range(0, len(mine), self.config.batch_size):
            indices = mine[start:start + self.config.batch_size]
            inputs, targets = blocks.inputs[indices].to(self.device), blocks.targets[indices].to(self.device)
            with self.precision.autocast(self.device):
                totals[0] += self.model(inputs, targets, reduction="sum").double()
            totals[1] += (targets != data.IGNORE_INDEX).sum()
        self.dist.sum(totals)
        self.model.train()
        return float(totals[0] / totals[1]) if totals[1] > 0 else None

    def sample(self) -> str:
        """A short story from a fixed prompt, for TensorBoard; its own generator leaves the training RNG alone."""
        from gpt2kids import sampling

        settings = sampling.SamplingSettings(max_new_tokens=60, top_k=50, repetition_penalty=1.2)
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self.model.eval()
        with torch.no_grad(), self.precision.autocast(self.device):
            prompt = self.tokenizer.encode(SAMPLE_PROMPT)
            [tokens] = sampling.generate(self.model, [prompt], settings, self.tokenizer.eos_id, generator)
        self.model.train()
        return SAMPLE_PROMPT + self.tokenizer.decode(tokens)

    # --- exports -------------------------------------------------------------------------------

    def card(self, which: str) -> dict[str, str]:
        config, dataset, progress = self.config, self.dataset, self.progress
        data_name = config.data or "the bundled gpt2kids Indonesian children's stories"
        hyperparameters = {
            "base model": self.base_model, "epochs": config.epochs, "micro-batch": config.batch_size,
            "gradient accumulation": config.grad_accum, "GPUs/processes": self.dist.world_size,
            "block size": dataset.train.inputs.shape[1], "learning rate": config.lr,
            "schedule": f"{config.schedule}, {config.warmup_steps} warm-up steps",
            "optimizer": "AdamW (betas 0.9, 0.999, eps 1e-8)", "weight decay": config.weight_decay,
            "max grad norm": config.max_grad_norm, "precision": self.precision.name, "seed": config.seed,
            "dropout": self.model.config.resid_pdrop,
        }
        description = (f"{data_name}: {dataset.train_stories} training stories ({dataset.train_bytes:,} bytes, "
                       f"{dataset.train.token_count:,} tokens), {dataset.eval_stories} held out")
        history = list(progress.history)
        at_epoch_end = progress.step_in_epoch == self.plan.steps_per_epoch
        if which == "best" and at_epoch_end:  # best/ is exported before finish_epoch records this epoch's row
            eval_loss = progress.best_eval_loss
            history.append({"epoch": progress.epoch + 1, "step": progress.step,
                            "train_loss": progress.epoch_loss_sum / max(progress.epoch_tokens, 1),
                            "eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 80.0))})
        epoch = progress.epoch + 1 if progress.step_in_epoch else progress.epoch
        stopped = (f"--max-steps {config.max_steps}" if which == "final" and config.max_steps is not None
                   and progress.step < self.total_steps else None)
        facts = model_card.CardFacts(
            title=f"gpt2kids: {Path(self.run_dir).name} ({which})", base_model=self.base_model,
            data_description=description, hyperparameters=hyperparameters, history=history, export=which,
            epoch=epoch, step=progress.step, total_steps=self.total_steps, stopped_early=stopped,
            eval_loss=progress.best_eval_loss if which == "best" else None,
            **({"dataset_name": Path(config.data).name} if config.data else {}))
        return model_card.card_files(facts)

    def export(self, which: str) -> None:
        if self.dist.is_main:
            try:
                export(self.model, self.tokenizer, self.run_dir / which, card_files=self.card(which))
            except OSError as error:
                raise UserError(f"{describe_os_error(error, self.run_dir / which)}; the previous export is "
                                "untouched") from None
        self.dist.barrier()

    # --- logging -------------------------------------------------------------------------------

    def open_writer(self) -> None:
        if not self.dist.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step drops events a killed run logged after its last checkpoint.
        self.writer = SummaryWriter(log_dir=str(self.run_dir),
                                    purge_step=self.progress.step if self.progress.step else None)
        if self.progress.step == 0:
            values = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                      for k, v in dataclasses.asdict(self.config).items()}
            for summary in hparams(values, {"eval/loss": 0.0, "eval/perplexity": 0.0}):
                self.writer.file_writer.add_summary(summary)

    def log(self, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, self.progress.step)

    # --- signals -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """Ctrl-C and SIGTERM finish the current step, then save a checkpoint and stop."""

        def request_stop(number: int, _frame: object) -> None:
            self.stop_signal = signal.Signals(number)
            print(f"\n{self.stop_signal.name} received: stopping after this step and saving a checkpoint "
                  "(send it again to abort without saving)", file=sys.stderr)
            signal.signal(number, previous[number])

        numbers = (signal.SIGINT, signal.SIGTERM)
        previous = {number: signal.getsignal(number) for number in numbers}
        for number in numbers:
            signal.signal(number, request_stop)
        try:
            yield
        finally:
            for number in numbers:
                signal.signal(number, previous[number])

    # --- the run -------------------------------------------------------------------------------

    def evaluate_and_report(self) -> float | None:
        eval_loss = self.evaluate()
        if eval_loss is not None:
            self.log({"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 80.0))})
            if self.dist.is_main and self.writer is not None:
                self.writer.add_text("sample", self.sample(), self.progress.step)
            if self.progress.best_eval_loss is None or eval_loss < self.progress.best_eval_loss:
                self.progress.best_eval_loss = eval_loss
                self.export("best")
        return eval_loss

    def run(self) -> Progress:
        self.model.train()
        self.open_writer()
        try:
            with self.stop_on_signals():
                while self.progress.epoch < self.config.epochs:
                    if self.run_epoch():
                        self.export("final")  # --max-steps: a smoke run still leaves a usable model
                        return self.progress
        finally:
            if self.writer is not None:
                self.writer.close()
        self.progress.finished = True
        self.export("final")
        self.save_checkpoint()
        return self.progress

    def run_epoch(self) -> bool:
        """Train to the end of the current epoch; True when the run stops early at --max-steps."""
        config, progress, plan = self.config, self.progress, self.plan
        order = data.epoch_order(len(self.dataset.train), config.seed, progress.epoch)
        epoch_started = time.perf_counter()
        with tqdm(total=plan.steps_per_epoch, initial=progress.step_in_epoch, file=sys.stderr,
                  desc=f"epoch {progress.epoch + 1}/{config.epochs}", disable=not self.dist.is_main,
                  dynamic_ncols=True, leave=False) as bar:
            while progress.step_in_epoch < plan.steps_per_epoch:
                step_started = time.perf_counter()
                result = self.train_step(plan.step_blocks(order, progress.step_in_epoch))
                tokens_per_s = result.tokens / max(time.perf_counter() - step_started, 1e-9)
                progress.step += 1
                progress.step_in_epoch += 1
                self.check_finite(result)
                if result.applied:
                    progress.epoch_loss_sum += result.loss * result.tokens
                    progress.epoch_tokens += result.tokens
                lr = self.optimizer.param_groups[0]["lr"]
                self.log({"train/loss": result.loss, "train/lr": lr, "train/grad_norm": result.grad_norm,
                          "train/tokens_per_s": tokens_per_s})
                bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
                bar.update(1)

                end_of_epoch = progress.step_in_epoch == plan.steps_per_epoch
                stop = self.dist.any(self.stop_signal is not None, self.device)
                at_limit = config.max_steps is not None and progress.step >= config.max_steps
                if config.eval_every and progress.step % config.eval_every == 0 and not end_of_epoch:
                    self.evaluate_and_report()
                if end_of_epoch:
                    self.finish_epoch(epoch_started)  # evaluates, exports and checkpoints
                elif stop or at_limit or (config.save_every and progress.step % config.save_every == 0):
                    self.save_checkpoint()
                if stop:
                    raise self.stopped()
                if at_limit:
                    return True
                if end_of_epoch:
                    return False
        return False

    def stopped(self) -> Stopped:
        received = self.stop_signal or signal.SIGTERM  # on another rank: torchrun passes SIGTERM/SIGINT on
        return Stopped(f"stopped by {received.name} at step {self.progress.step}; a checkpoint is saved; "
                       f"continue with: python train.py --out {self.run_dir} --resume", 128 + int(received))

    def finish_epoch(self, epoch_started: float) -> None:
        progress = self.progress
        eval_loss = self.evaluate_and_report()
        train_loss = progress.epoch_loss_sum / max(progress.epoch_tokens, 1)
        row = {"epoch": progress.epoch + 1, "step": progress.step, "train_loss": train_loss, "eval_loss": eval_loss,
               "perplexity": math.exp(min(eval_loss, 80.0)) if eval_loss is not None else None}
        progress.history.append(row)
        if self.dist.is_main:
            seconds = time.perf_counter() - epoch_started
            summary = f"epoch {row['epoch']}/{self.config.epochs}: train loss {train_loss:.4f}"
            if eval_loss is not None:
                summary += f", eval loss {eval_loss:.4f}, perplexity {row['perplexity']:.2f}"
            tqdm.write(f"{summary} ({seconds:.0f} s, step {progress.step})", file=sys.stderr)
        progress.epoch += 1
        progress.step_in_epoch = 0
        progress.epoch_loss_sum, progress.epoch_tokens = 0.0, 0
        # The exports come first: a kill between them and this checkpoint replays the epoch's tail.
        self.save_checkpoint()

    def check_finite(self, result: StepResult) -> None:
        progress = self.progress
        progress.skipped_in_a_row = 0 if result.applied else progress.skipped_in_a_row + 1
        if result.applied:
            return
        if self.precision.needs_grad_scaler and progress.skipped_in_a_row < MAX_SKIPPED_STEPS:
            return  # fp16: the scaler lowers its scale and the next step usually succeeds
        raise TrainingDiverged(
            f"the loss became non-finite at step {progress.step} (loss {result.loss}, grad norm "
            f"{result.grad_norm}); the run stopped and {self.run_dir / checkpoint.CHECKPOINT} and the exports "
            "hold the last good state; lower --lr or use --precision fp32")


# --- entry point ---------------------------------------------------------------------------------

def train(config: TrainConfig) -> Progress:
    """Run (or resume) a training run; returns its final progress."""
    config.validate()
    dist = Distributed.from_environment(config.device)
    try:
        return build_trainer(config, dist).run()
    finally:
        dist.close()


def build_trainer(config: TrainConfig, dist: Distributed | None = None) -> Trainer:
    """Everything before the first step: run folder, data, model, optimizer; restored on --resume."""
    dist = dist or Distributed()
    config, run_dir = prepare_run_folder(config, dist)
    device = resolve_device(dist.device_name(config.device))
    precision = choose_precision(config.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: the usual speed/precision trade on Ampere+
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(config.seed)
    train_stories, eval_stories = data.load_split(config.data or data.BUNDLED_STORIES, config.eval_data,
                                                  config.eval_split, config.seed)
    saved = checkpoint.load_latest_good(run_dir) if config.resume else None
    if saved is not None:
        model = GPT2(GPT2Config.from_hf_dict(saved.state["model_config"]))
        tokenizer = Tokenizer.from_json_string(saved.state["tokenizer"])
        base_model = config.init
    else:
        model, tokenizer, base_model = build_model_and_tokenizer(config, train_stories)
    check_tokenizer_fits(tokenizer, model.config)
    block_size = config.block_size or min(1024, model.config.n_positions)
    if block_size > model.config.n_positions:
        raise UserError(f"--block-size {block_size} exceeds the model's context of {model.config.n_positions}; "
                        f"use --block-size {model.config.n_positions} or less")
    config.block_size = block_size
    dataset = data.build_dataset(train_stories, eval_stories, tokenizer, block_size)
    if dist.is_main and not config.resume:
        # The run folder appears only now, once every input has been checked.
        try:
            atomic_write_text(run_dir / TRAIN_CONFIG, config.to_json())
        except OSError as error:
            raise UserError(describe_os_error(error, run_dir)) from None
    dist.barrier()
    trainer = Trainer(config, model.to(device), tokenizer, dataset, run_dir, device, precision, dist, base_model)
    if saved is not None:
        trainer.restore(saved)
        if trainer.progress.finished:
            raise UserError(f"the run in {run_dir} has already finished; nothing to resume")
        if dist.is_main:
            print(f"resuming {run_dir} at step {trainer.progress.step} (epoch {trainer.progress.epoch + 1})",
                  file=sys.stderr)
    if dist.is_main:
        print(f"{run_dir}: {model.num_parameters():,} parameters on {device} ({precision.name}), "
              f"{len(dataset.train)} training blocks of {block_size} tokens, {trainer.plan.steps_per_epoch} steps "
              f"per epoch, {trainer.total_steps} in all", file=sys.stderr)
    return trainer
