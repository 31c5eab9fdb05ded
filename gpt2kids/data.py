"""The corpus: reading stories, the story-level split, tokenising (cached), packing into blocks.

A block is `block_size` consecutive tokens of the concatenated stories, each story ended by the
tokenizer's end-of-text token. As in Hugging Face's causal-LM recipe, a block predicts its own next
tokens: the last position of each block, and the padding of the final partial block, have no target.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gpt2kids.atomic_files import atomic_path, visible_files
from gpt2kids.errors import UserError, warn
from gpt2kids.model import IGNORE_INDEX
from gpt2kids.tokenizer import Tokenizer
from gpt2kids.train_config import TRAIN_CONFIG

BUNDLED_STORIES = Path(__file__).resolve().parent / "stories"
BLANK_LINES = re.compile(r"\n\s*\n")
MIN_STORIES = 2  # one to train on and one to hold out
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")  # beside a config.json
DEFAULT_BLOCK_SIZE = 1024  # tokens per block unless a model's context is shorter: the published run's blocks


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --- reading -------------------------------------------------------------------------------------

def _decode(raw: bytes) -> str | None:
    """UTF-8 (with or without BOM) text with LF line ends, or None if the bytes are not text."""
    if b"\x00" in raw:
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_text_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    text = _decode(raw)
    if text is None:
        raise UserError(f"{path} is not UTF-8 text; pass a .txt, a .jsonl or a folder of .txt stories")
    return text


def jsonl_field(text: str, field: str, source: str | Path) -> list[str]:
    """The string `field` of every record of a JSON-lines text; blank lines are skipped."""
    values = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{source} line {number} is not valid JSON ({error.msg}); "
                            "fix or remove that line") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise UserError(f"{source} line {number} has no \"{field}\" string field; each line needs one")
        try:
            record[field].encode("utf-8")
        except UnicodeEncodeError:  # JSON lets "\ud800" through; no tokenizer can read it
            raise UserError(f"{source} line {number}: its \"{field}\" holds a lone surrogate escape (like \\ud800), "
                            "which is not text; fix that line") from None
        values.append(record[field])
    return values


def run_or_model(folder: Path) -> str | None:
    """"run" for a gpt2kids run folder (its train_config.json), "model" for a model folder (a config.json beside
    the weights), else None: neither holds stories, though an export's merges.txt is a .txt."""
    if (folder / TRAIN_CONFIG).is_file():
        return "run"
    if (folder / "config.json").is_file() and any((folder / name).is_file() for name in MODEL_WEIGHTS):
        return "model"
    return None


def read_stories(path: str | Path, flag: str = "--data") -> list[str]:
    """Stories from a folder of .txt files (one story each), a .txt of blank-line-separated stories,
    or a .jsonl with a `text` field. Whitespace is trimmed and empty stories dropped; errors name `flag`."""
    path = Path(path)
    if path.is_dir():
        if kind := run_or_model(path):
            raise UserError(f"{flag} {path} is a {kind} folder, not stories; pass the stories (evaluate --data takes a "
                            "run folder and scores the stories it held out)")
        # Stories are the .txt files; hidden folders (.git, ...), other files (a README.md) and the folders of runs
        # and models (`--out` inside `--data`: an export's merges.txt is no story) are not.
        skipped_folders: list[Path] = []

        def skip(folder: Path) -> bool:
            if run_or_model(folder):
                skipped_folders.append(folder)
                return True
            return False

        candidates = visible_files(path, skip)
        if skipped_folders:
            names = sorted(f"{folder.relative_to(path)}/" for folder in skipped_folders)
            warn(f"skipped {len(names)} run or model folder(s) in {path}, which hold no stories: "
                 f"{', '.join(names[:5])}" + (" ..." if len(names) > 5 else ""))
        files = [p for p in candidates if p.suffix.lower() == ".txt"]
        if len(files) < len(candidates):
            others = [str(p.relative_to(path)) for p in candidates if p.suffix.lower() != ".txt"]
            warn(f"read only the .txt files in {path}; skipped {len(others)} other file(s): {', '.join(others[:5])}"
                 + (" ..." if len(others) > 5 else ""))
        stories, skipped = [], []
        for file in files:
            try:
                text = _decode(file.read_bytes())
            except OSError as error:
                raise UserError(f"cannot read {file}: {error.strerror}; fix its permissions or move it out of "
                                f"{path}") from None
            if text is None:
                skipped.append(file.name)
            else:
                stories.append(text)
        if skipped:
            warn(f"skipped {len(skipped)} file(s) in {path} that are not UTF-8 text: {', '.join(skipped[:10])}")
    elif path.is_file():
        text = _read_text_file(path)
        stories = jsonl_field(text, "text", path) if path.suffix.lower() == ".jsonl" else BLANK_LINES.split(text)
    else:
        problem = "is not a file or a folder" if path.exists() else "does not exist"  # /dev/null, a socket
        raise UserError(f"{flag} {path} {problem}; pass a folder of .txt stories, a .txt or a .jsonl")
    stories = [story for story in map(str.strip, stories) if story]
    if not stories:
        raise UserError(f"{flag} {path} holds no stories (no non-empty UTF-8 text); check the path")
    return stories


def split_stories(stories: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out whole stories, chosen by a seeded shuffle, so no story is split across the sets."""
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"--eval-split {eval_fraction} must be in [0, 1)")
    if eval_fraction == 0.0:
        return list(stories), []
    if len(stories) < MIN_STORIES:
        raise UserError(f"the corpus has {len(stories)} story; at least {MIN_STORIES} are needed to hold "
                        "some out (add stories, or pass --eval-split 0 or --eval-data)")
    order = list(range(len(stories)))
    random.Random(seed).shuffle(order)
    held_out = min(len(stories) - 1, max(1, round(eval_fraction * len(stories))))
    eval_indices = set(order[:held_out])
    train = [s for i, s in enumerate(stories) if i not in eval_indices]
    evaluation = [s for i, s in enumerate(stories) if i in eval_indices]
    return train, evaluation


# --- tokenising, with a cache --------------------------------------------------------------------

def cache_root() -> Path:
    """Where gpt2kids keeps what it can compute again (token ids, decoding-kernel timings)."""
    return Path(os.environ.get("GPT2KIDS_CACHE", Path.home() / ".cache" / "gpt2kids"))


def add_stories(digest: Any, stories: list[str]) -> None:
    """Feed `stories` to a hash, each one's length first: no two different lists feed the same bytes."""
    digest.update(f"\x00stories {len(stories)}".encode())
    for story in stories:
        raw = story.encode("utf-8")
        digest.update(f"\x00story {len(raw)}\x00".encode())
        digest.update(raw)


def cache_key(stories: list[str], tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256()
    digest.update(tokenizer.backend.to_str().encode("utf-8"))
    digest.update(f"\x00eos\x00{tokenizer.eos_id}".encode())  # the same BPE may end stories with another id
    add_stories(digest, stories)
    return digest.hexdigest()[:32]


def ids_digest(ids: torch.Tensor) -> str:
    """SHA-256 of a 1-D int32 tensor's bytes (anything else: no digest)."""
    if ids.dim() != 1 or ids.dtype != torch.int32:
        return ""
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()


def corpus_digest(train_stories: list[str], eval_stories: list[str]) -> str:
    """SHA-256 of both story sets: a checkpoint keeps it, so that a resume on changed stories is refused."""
    digest = hashlib.sha256()
    add_stories(digest, train_stories)
    add_stories(digest, eval_stories)
    return digest.hexdigest()


def tokenize_stories(stories: list[str], tokenizer: Tokenizer, use_cache: bool = True) -> torch.Tensor:
    """All stories as one stream of token ids, each story followed by the end-of-text id."""
    path = cache_root() / "tokens" / f"{cache_key(stories, tokenizer)}.safetensors"
    if use_cache and path.is_file():
        try:
            with safe_open(path, "pt") as cached:
                ids, recorded = cached.get_tensor("ids"), (cached.metadata() or {}).get("sha256")
        except (SafetensorError, OSError, KeyError):
            ids, recorded = None, "unreadable"
        if ids is not None and recorded == ids_digest(ids):  # a file that parses may still hold other bytes
            return ids.long()
        if recorded is not None:  # an entry from before the digest (None) is written again without a word
            warn(f"token cache {path} is damaged; tokenizing again")
    ids: list[int] = []
    for encoded in tokenizer.encode_batch(stories):
        ids.extend(encoded)
        ids.append(tokenizer.eos_id)
    stream = torch.tensor(ids, dtype=torch.long)
    if use_cache:
        try:
            with atomic_path(path) as temporary:
                ids = stream.to(torch.int32)
                save_file({"ids": ids}, temporary, metadata={"sha256": ids_digest(ids)})
        except OSError as error:  # a cache we cannot write only costs time
            warn(f"could not write the token cache {path} ({error.strerror})")
    return stream


# --- blocks --------------------------------------------------------------------------------------

@dataclass
class Blocks:
    """Training examples: inputs (N, T) and next-token targets (N, T) with IGNORE_INDEX for no loss."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def token_count(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def pack_blocks(stream: torch.Tensor, block_size: int, pad_id: int) -> Blocks:
    # A last token alone in its block has nothing to predict: that block, all targets and no loss, would be
    # a step of no data (with --batch-size 1) that still moved the weights. So it is left out.
    blocks = ceil_div(max(len(stream) - 1, 0), block_size)
    kept = min(len(stream), blocks * block_size)
    padded = torch.full((blocks * block_size,), pad_id, dtype=torch.long)
    padded[:kept] = stream[:kept]
    inputs = padded.view(blocks, block_size)
    valid = (torch.arange(blocks * block_size) < kept).view(blocks, block_size)
    targets = torch.full_like(inputs, IGNORE_INDEX)
    # Position t predicts token t + 1 of the same block, where that token is real.
    targets[:, :-1] = torch.where(valid[:, 1:], inputs[:, 1:], IGNORE_INDEX)
    return Blocks(inputs, targets)


@dataclass
class Dataset:
    train: Blocks
    eval: Blocks | None
    train_story_count: int
    eval_story_count: int
    train_bytes: int
    train_tokens: int  # the training stories' tokens, end-of-text included (a block's last one has no target)
    digest: str  # corpus_digest of the two story sets


def build_dataset(train_stories: list[str], eval_stories: list[str], tokenizer: Tokenizer,
                  block_size: int) -> Dataset:
    stream = tokenize_stories(train_stories, tokenizer)
    train = pack_blocks(stream, block_size, tokenizer.eos_id)
    if train.token_count == 0:
        raise UserError(f"the training stories give no training tokens at --block-size {block_size}; "
                        "add stories or raise --block-size")
    evaluation = None
    if eval_stories:
        evaluation = pack_blocks(tokenize_stories(eval_stories, tokenizer), block_size, tokenizer.eos_id)
    return Dataset(train, evaluation, len(train_stories), len(eval_stories),
                   sum(len(s.encode("utf-8")) for s in train_stories), len(stream),
                   corpus_digest(train_stories, eval_stories))


def load_split(data: str | Path, eval_data: str | Path | None, eval_fraction: float,
               seed: int) -> tuple[list[str], list[str]]:
    """(train stories, held-out stories): an explicit --eval-data, else a seeded story-level split."""
    stories = read_stories(data)
    if eval_data is not None:
        train, held_out = stories, read_stories(eval_data, "--eval-data")
    else:
        train, held_out = split_stories(stories, eval_fraction, seed)
    trained_on = set(train)
    repeated = sum(story in trained_on for story in held_out)
    if repeated:  # the same text twice in a corpus, or --eval-data overlapping --data: the eval loss flatters
        warn(f"{repeated} of the {len(held_out)} held-out stories are training stories too (the same text); their "
             "eval loss is not on unseen text")
    return train, held_out


# --- batches -------------------------------------------------------------------------------------

def epoch_order(num_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled block order of one epoch: a pure function of (seed, epoch), so resume is exact."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)  # manual_seed takes < 2**63
    return torch.randperm(num_blocks, generator=generator)


@dataclass(frozen=True)
class StepPlan:
    """How an epoch is cut into optimizer steps, identically on every rank.

    A micro-batch is `batch_size * world_size` blocks (each rank takes its `batch_size` slice); an
    optimizer step is `grad_accum` micro-batches; the last step of an epoch may be shorter.
    """

    num_blocks: int
    batch_size: int
    grad_accum: int
    world_size: int = 1

    @property
    def blocks_per_micro_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def micro_batches_per_epoch(self) -> int:
        return ceil_div(self.num_blocks, self.blocks_per_micro_batch)

    @property
    def steps_per_epoch(self) -> int:
        return ceil_div(self.micro_batches_per_epoch, self.grad_accum)

    def step_blocks(self, order: torch.Tensor, step_in_epoch: int) -> list[torch.Tensor]:
        """The global block indices of each micro-batch of one optimizer step."""
        first = step_in_epoch * self.grad_accum
        last = min(first + self.grad_accum, self.micro_batches_per_epoch)
        size = self.blocks_per_micro_batch
        return [order[m * size:(m + 1) * size] for m in range(first, last)]

    def rank_slice(self, micro_batch: torch.Tensor, rank: int) -> torch.Tensor:
        return micro_batch[rank * self.batch_size:(rank + 1) * self.batch_size]
