"""The settings of a training run (`TrainConfig`) and the `python train.py` flags that fill them.

Each field is one flag (`batch_size` is `--batch-size`), with its default and help text here, so the
flags, their defaults and `--help` come from one place (`run_folder` saves them as train_config.json).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from gpt2kids.cli import ArgumentParser, check_seed, flags_given
from gpt2kids.config import PRESETS
from gpt2kids.device import PRECISIONS
from gpt2kids.errors import UserError
from gpt2kids.optimizer import SCHEDULES
from gpt2kids.tokenizer import check_bpe_vocab_size

DEFAULT_INIT = "flax-community/gpt2-small-indonesian"
TRAIN_CONFIG = "train_config.json"  # a run folder's copy of its settings: marks the folder as a run
# Settings of one invocation rather than of the run: a resumed run takes these from the command line.
SESSION_FIELDS = ("out", "resume", "max_steps", "device", "compile", "push_to_hub", "private", "drop_resume_state")
EXAMPLES = """examples:
  python train.py                                   # the published recipe on the bundled stories
  python train.py --init scratch --model-size tiny --epochs 1 --lr 1e-3 --out runs/demo   # offline CPU demo
  python train.py --data my-stories/ --epochs 3 --early-stopping 2 --out runs/mine
  python train.py --out runs/mine --resume          # continue a stopped run
  torchrun --nproc_per_node=2 train.py              # data-parallel on 2 GPUs
"""


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag(default: Any, help: str, **argparse_options: Any) -> Any:
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass
class TrainConfig:
    data: str | None = flag(None, "a folder of .txt stories (one per file), a .txt of blank-line-separated "
                                  "stories, or a .jsonl with a text field (default: the bundled stories)")
    init: str = flag(DEFAULT_INIT, "a hub id, a local HF folder, a gpt2kids run folder or export, or 'scratch'")
    model_size: str = flag("small", "with --init scratch: tiny (4 layers, 256 wide, 256 context) or small "
                                    "(GPT-2 Small)", choices=("tiny", "small"))
    tokenizer: str | None = flag(None, "tokenizer.json, or a folder with it or with vocab.json + merges.txt (default: "
                                       "the init checkpoint's; with --init scratch, a BPE trained on the stories)")
    vocab_size: int = flag(8000, "the most tokens of a tokenizer trained with --init scratch")
    out: str | None = flag(None, "run folder (default: runs/<date-time>)")
    epochs: int = flag(10, "passes over the training stories")
    batch_size: int = flag(8, "micro-batch: sequences per forward")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    block_size: int | None = flag(None, "tokens per training sequence (default: min(1024, model context))")
    lr: float = flag(5e-5, "peak learning rate")
    schedule: str = flag("linear", "learning-rate schedule after the warm-up", choices=SCHEDULES)
    warmup_steps: int = flag(0, "optimizer steps of linear warm-up")
    weight_decay: float = flag(0.0, "AdamW weight decay, on 2-D weights only")
    max_grad_norm: float = flag(1.0, "clip the gradient norm to this; 0 turns clipping off")
    eval_split: float = flag(0.1, "fraction of stories held out (whole stories, chosen by the seed)")
    eval_data: str | None = flag(None, "an explicit held-out set (same formats as --data); no split is made then")
    eval_every: int | None = flag(None, "also evaluate every N optimizer steps (default: each epoch)")
    save_every: int | None = flag(None, "also checkpoint every N optimizer steps (default: each epoch)")
    precision: str = flag("auto", "auto: bf16 where the device does bf16 well, fp16 with a grad scaler on "
                                  "older CUDA, fp32 otherwise", choices=PRECISIONS)
    device: str = flag("auto", "auto, cpu, cuda, cuda:N or mps")
    compile: bool = flag(False, "torch.compile the model")
    seed: int = flag(42, "seed of the split, the block order, dropout and the initialisation")
    resume: bool = flag(False, "continue the run in --out from its last checkpoint")
    max_steps: int | None = flag(None, "stop after N optimizer steps (smoke runs; --resume continues)")
    dropout: float | None = flag(None, "override the model's dropout rates (default: the checkpoint's)")
    early_stopping: int | None = flag(None, "stop when N evaluations in a row bring no new lowest eval loss")
    push_to_hub: str | None = flag(None, "when the run ends, upload best/ (else final/) to this hub repo id")
    private: bool = flag(False, "with --push-to-hub: make a new repo private")
    drop_resume_state: bool = flag(False, "when the run has finished well, delete checkpoint/ and "
                                          "checkpoint-previous/ (the exports stay; the run cannot be resumed)")

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "block_size", "lr", "eval_every", "save_every",
                     "max_steps", "vocab_size", "early_stopping"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{flag_name(name)} must be positive, got {value}")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if value < 0 or not math.isfinite(value):
                raise UserError(f"{flag_name(name)} must be a finite number >= 0, got {value}")
        if not math.isfinite(self.lr):
            raise UserError(f"--lr must be finite, got {self.lr}")
        if not 0.0 <= self.eval_split < 1.0:
            raise UserError(f"--eval-split must be in [0, 1), got {self.eval_split}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        check_seed(self.seed, "--seed")
        if self.early_stopping and self.eval_split == 0 and self.eval_data is None:
            raise UserError("--early-stopping needs held-out stories to evaluate: keep --eval-split above 0, or "
                            "pass --eval-data")
        if self.private and not self.push_to_hub:
            raise UserError("--private only applies with --push-to-hub REPO_ID")
        # Given on the command line of a new run (a resumed run's own settings are its own: not checked here).
        scratch_only = [flag_name(name) for name in ("model_size", "vocab_size")
                        if name in (getattr(self, "given", None) or ())]
        if scratch_only and self.init != "scratch" and not self.resume:
            raise UserError(f"{' and '.join(scratch_only)} only appl{'ies' if len(scratch_only) == 1 else 'y'} with "
                            "--init scratch (a checkpoint brings its own size and tokenizer): drop "
                            f"{'it' if len(scratch_only) == 1 else 'them'}, or add --init scratch")
        if self.init == "scratch" and self.model_size in PRESETS:  # said before a BPE is trained, not after
            if self.block_size is not None:
                check_block_size(self.block_size, PRESETS[self.model_size].n_positions)
            if not self.tokenizer:
                check_bpe_vocab_size(self.vocab_size)
        for name in ("data", "eval_data", "tokenizer", "out"):
            if getattr(self, name) == "":  # an unset shell variable: not "the default", and not "."
                raise UserError(f"{flag_name(name)} is empty; name a file or folder, or leave the flag out")
        if self.resume and not self.out:  # the default --out is a new, empty folder
            raise UserError("--resume needs --out RUN_FOLDER, the run to continue (e.g. --out runs/NAME --resume)")

    def differences(self, other: TrainConfig) -> list[str]:
        """The flags set here (given on the command line, see `parse_args`; else: not at their default) to
        something other than `other`'s value."""
        given = getattr(self, "given", None)
        defaults = TrainConfig()
        return [flag_name(f.name) for f in dataclasses.fields(self)
                if f.name not in SESSION_FIELDS and getattr(self, f.name) != getattr(other, f.name)
                and (f.name in given if given is not None else getattr(self, f.name) != getattr(defaults, f.name))]


def check_block_size(block_size: int, context: int) -> None:
    if block_size > context:
        raise UserError(f"--block-size {block_size} exceeds the model's context of {context}; "
                        f"use --block-size {context} or less")


def build_parser() -> ArgumentParser:
    """The flags of `TrainConfig`."""
    parser = ArgumentParser(prog="python train.py", epilog=EXAMPLES,
                            description="Fine-tune GPT-2 on Indonesian children's stories (or train one from "
                                        "scratch). Writes a run folder: TensorBoard events, checkpoints, and "
                                        "best/ and final/ exports that transformers loads unchanged.")
    for setting in dataclasses.fields(TrainConfig):
        if setting.type == "bool":
            parser.add_argument(flag_name(setting.name), action="store_true", default=setting.default,
                                **setting.metadata)
            continue
        kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(setting.type, str)
        parser.add_argument(flag_name(setting.name), type=kind, default=setting.default, **setting.metadata)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    config = TrainConfig(**vars(parser.parse_args(argv)))
    # The flags given, whatever their values: on --resume, one given at its default is ignored as much as
    # any other, and the note says so.
    config.given = flags_given(parser, sys.argv[1:] if argv is None else argv)
    return config

