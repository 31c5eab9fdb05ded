"""python -m gpt2kids.evaluate: the loss and perplexity of one or more models on a set of texts.

The blocks are made as Hugging Face's causal-LM recipe (run_clm) makes them (`make_blocks`), and the loss is
the mean over every next-token prediction, as the 2021 Trainer behind the published card reported its eval
loss, so the figure stands beside that card's 3.777.
"""

from __future__ import annotations

from gpt2kids.cli import quiet_interrupt_while_starting

if __name__ == "__main__":  # python -m gpt2kids.evaluate
    quiet_interrupt_while_starting()  # before torch's import

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from gpt2kids import run_folder
from gpt2kids.cli import ArgumentParser, run_cli
from gpt2kids.config import GPT2Config
from gpt2kids.data import DEFAULT_BLOCK_SIZE, read_stories
from gpt2kids.device import PRECISIONS, Precision, choose_precision, resolve_device
from gpt2kids.errors import UserError, say, warn
from gpt2kids.hf import load_model, load_tokenizer, resolve
from gpt2kids.loss import perplexity
from gpt2kids.memory_saving import use_memory_saving_kernels
from gpt2kids.model import GPT2, IGNORE_INDEX
from gpt2kids.tokenizer import Tokenizer

TOKENIZERS_DIFFER = ("note: the tokenizers differ, so each model is scored on its own tokens of the same texts; "
                     "losses are then not per the same tokens")


@dataclass(frozen=True)
class Result:
    model: str
    loss: float
    perplexity: float
    tokens: int  # next-token predictions counted: blocks x (T - 1)
    blocks: int


def make_blocks(texts: list[str], tokenizer: Tokenizer, block_size: int) -> torch.Tensor:
    """(N, block_size) token ids: the texts tokenized, concatenated, cut; the last partial block dropped."""
    ids = [token for encoded in tokenizer.encode_batch(texts) for token in encoded]
    count = len(ids) // block_size
    return torch.tensor(ids[:count * block_size], dtype=torch.long).view(count, block_size)


@torch.no_grad()
def mean_loss(model: GPT2, blocks: torch.Tensor, precision: Precision, batch_size: int = 8,
              label: str | None = None) -> tuple[float, int]:
    """Mean cross-entropy over every next-token prediction in `blocks` (T - 1 per block), and their count."""
    model.eval()  # no dropout
    device = model.lm_head.weight.device
    total = 0.0  # a Python float: the sum over many batches keeps fp64 precision
    batches = range(0, len(blocks), batch_size)
    for start in tqdm(batches, desc=label, unit="batch", file=sys.stderr, disable=None, leave=False):
        inputs = blocks[start:start + batch_size].to(device)
        # Position t predicts token t + 1 of its block; the last position has nothing to predict.
        targets = torch.full_like(inputs, IGNORE_INDEX)
        targets[:, :-1] = inputs[:, 1:]
        with precision.autocast(device):
            total += float(model(inputs, targets, reduction="sum"))
    predictions = blocks.shape[0] * (blocks.shape[1] - 1)
    return total / predictions, predictions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m gpt2kids.evaluate", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("models", nargs="+", metavar="SPEC", help="a hub id, a model folder or a gpt2kids run folder")
    add("--data", required=True, metavar="PATH",
        help="the texts: a folder of .txt files, a .txt of blank-line-separated texts, a .jsonl with a text field, "
             "or a gpt2kids run folder (the stories it held out)")
    add("--block-size", type=int, metavar="N", help="tokens per block (default: min(1024, the smallest model context))")
    add("--batch-size", type=int, default=8, metavar="N", help="blocks per forward")
    add("--precision", default="auto", choices=PRECISIONS,
        help="auto: bf16 autocast where the device does bf16 well, else fp32 (or fp16 on older CUDA)")
    add("--device", default="auto", metavar="NAME", help="auto, cpu, cuda, cuda:N or mps")
    add("--format", default="text", choices=("text", "jsonl"), help="an aligned table, or one JSON object per model")
    return parser.parse_args(argv)


def table(results: list[Result]) -> str:
    """An aligned table: the model left-aligned, the figures right-aligned."""
    rows = [("model", "loss", "perplexity", "tokens", "blocks")]
    rows += [(r.model, f"{r.loss:.4f}", f"{r.perplexity:.2f}", f"{r.tokens:,}", f"{r.blocks:,}") for r in results]
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    lines = []
    for name, *figures in rows:
        cells = [name.ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(figures, widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


@dataclass(frozen=True)
class Candidate:
    """One model to score: its label in the results, its folder, and the blocks its tokenizer makes."""

    label: str
    folder: Path
    blocks: torch.Tensor


def read_texts(data: str) -> list[str]:
    """The texts at `data`: a gpt2kids run folder's held-out stories, or stories in any form data.py reads."""
    path = Path(data)
    return run_folder.held_out_stories(path) if (path / run_folder.TRAIN_CONFIG).is_file() else read_stories(path)


def prepare_candidates(specs: list[str], texts: list[str], source: str,
                       block_size: int | None = None) -> tuple[list[Candidate], int]:
    """Each model's blocks of the texts, cut to one block size for all (`block_size`, else min(1024, the smallest
    context)), and that size; raises `UserError` for a model the texts cannot score (naming `source`, where the
    texts came from)."""
    folders = [resolve(spec) for spec in specs]
    configs = [GPT2Config.from_json_file(folder / "config.json") for folder in folders]
    tokenizers = [load_tokenizer(folder) for folder in folders]
    if block_size is None:  # not `or`: --block-size 0 is refused below, not replaced
        block_size = min(DEFAULT_BLOCK_SIZE, *(config.n_positions for config in configs))
        if any(min(DEFAULT_BLOCK_SIZE, config.n_positions) > block_size for config in configs):
            say(f"note: every model is scored on blocks of {block_size} tokens, the smallest context among them; a "
                "figure compares with another (a published card's) only at the same block size")
    if block_size < 2:
        raise UserError(f"--block-size {block_size} is too small; a block of T tokens gives T - 1 predictions, "
                        "so use 2 or more")
    blocks_of: dict[str, torch.Tensor] = {}  # serialized tokenizer -> its blocks: models that share one share them
    candidates = []
    for spec, folder, tokenizer, config in zip(specs, folders, tokenizers, configs, strict=True):
        if block_size > config.n_positions:
            raise UserError(f"--block-size {block_size} exceeds the context of {spec} ({config.n_positions} tokens); "
                            f"use --block-size {config.n_positions} or less")
        key = tokenizer.backend.to_str()
        if key not in blocks_of:
            blocks_of[key] = make_blocks(texts, tokenizer, block_size)
        blocks = blocks_of[key]
        if len(blocks) == 0:
            raise UserError(f"the texts in {source} give fewer than {block_size} tokens with the tokenizer of "
                            f"{spec}, so not one block; add texts or lower --block-size")
        if int(blocks.max()) >= config.vocab_size:
            raise UserError(f"the tokenizer of {spec} gives ids up to {int(blocks.max())} but the model has "
                            f"{config.vocab_size} embeddings; the folder's tokenizer does not belong to its model")
        # A run folder is scored through one of its exports: the label names which.
        label = f"{spec} ({folder.name}/)" if folder.parent == Path(spec).expanduser() else spec
        candidates.append(Candidate(label, folder, blocks))
    return candidates, block_size


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")


def score(candidate: Candidate, device: torch.device, precision: Precision, batch_size: int = 8) -> Result:
    """Load the candidate's model (one in memory at a time: it is freed on return) and score its blocks."""
    check_batch_size(batch_size)
    model, _ = load_model(candidate.folder, device)
    use_memory_saving_kernels(model)  # the loss by chunks: the full logits never exist
    loss, predictions = mean_loss(model, candidate.blocks, precision, batch_size, label=candidate.label)
    if not math.isfinite(loss):
        warn(f"the loss of {candidate.label} is not finite: its weights or its precision overflow; try "
             "--precision fp32")
    return Result(candidate.label, loss, perplexity(loss), predictions, len(candidate.blocks))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_batch_size(args.batch_size)  # before anything loads
    texts = read_texts(args.data)
    device = resolve_device(args.device)
    precision = choose_precision(args.precision, device)
    candidates, block_size = prepare_candidates(args.models, texts, args.data, args.block_size)
    print(f"{args.data}: {len(texts)} text{'' if len(texts) == 1 else 's'}; blocks of {block_size} tokens, the last "
          "partial block dropped; "
          f"{device} ({precision.name})", file=sys.stderr)
    # Tokenizers that serialize differently may still cut the texts into the same tokens: the blocks decide.
    tokens_differ = any(not torch.equal(other.blocks, candidates[0].blocks) for other in candidates[1:])
    if tokens_differ and args.format == "jsonl":
        print(TOKENIZERS_DIFFER, file=sys.stderr)  # stdout holds JSON only
    results = []
    for candidate in candidates:
        results.append(score(candidate, device, precision, args.batch_size))
        if args.format == "jsonl":  # JSON has no NaN or Infinity: a non-finite figure is null
            record = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                      for key, value in asdict(results[-1]).items()}
            print(json.dumps(record), flush=True)
    if args.format == "text":
        print(table(results))
        if tokens_differ:
            print(TOKENIZERS_DIFFER)
    return 0


if __name__ == "__main__":
    run_cli(main)
