"""Logits processors and the decode loop behind `python generate.py`.

The processors are small pure functions over a (B, V) float32 score tensor. `generate` applies them
in the order transformers' `generate` does: repetition penalty, no-repeat n-gram, then (when
sampling) temperature, top-k and top-p. A processor that would change nothing is skipped.

The loop left-pads a batch of prompts, runs one prefill forward into a preallocated `KVCache`, then
feeds one token per step. Each sequence stops on its own at end-of-text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gpt2kids.errors import UserError
from gpt2kids.model import GPT2, KVCache, build_mask

# Called after each step with one entry per output row: the row's new token, or None when the row
# produced nothing (it had already finished, or it has just produced end-of-text).
StepCallback = Callable[[list[int | None]], None]


@dataclass
class SamplingSettings:
    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    greedy: bool = False
    num_return_sequences: int = 1

    def validate(self) -> None:
        """Raise `UserError` naming the first bad value and what it must be."""
        if self.max_new_tokens <= 0:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 < self.top_p <= 1:  # also refuses NaN
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}; 1 turns it off")
        if not self.greedy and not self.temperature > 0:
            raise UserError(f"--temperature must be above 0, got {self.temperature}; "
                            "for deterministic argmax decoding pass --greedy")
        if self.top_k < 0:
            raise UserError(f"--top-k must be 0 (off) or more, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise UserError(f"--repetition-penalty must be above 0 (1 turns it off), got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise UserError(f"--no-repeat-ngram-size must be 0 (off) or more, got {self.no_repeat_ngram_size}")
        if self.num_return_sequences < 1:
            raise UserError(f"--num-return-sequences must be at least 1, got {self.num_return_sequences}")


# --- logits processors ----------------------------------------------------------------------------

def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every token already in the row's history (prompt and generated), once each.

    `seen` is a (B, V) bool mask of those tokens. Negative scores are multiplied by the penalty and
    positive ones divided, so a penalty above 1 always makes a seen token less likely.
    """
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def seen_tokens(histories: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """The (B, V) bool mask `apply_repetition_penalty` takes, built from token-id lists."""
    seen = torch.zeros(len(histories), vocab_size, dtype=torch.bool, device=device)
    for row, history in enumerate(histories):
        if history:
            seen[row, torch.tensor(list(history), device=device)] = True
    return seen


class NGramBans:
    """Per row, which next tokens would complete an n-gram already seen in that row.

    Kept incrementally: each appended token records one n-gram, so a step costs O(rows) rather than
    a rescan of the whole history.
    """

    def __init__(self, histories: Sequence[Sequence[int]], n: int) -> None:
        if n < 1:
            raise ValueError("n-gram size must be at least 1")
        self.n = n
        self.tokens: list[list[int]] = [[] for _ in histories]
        self.followers: list[dict[tuple[int, ...], set[int]]] = [{} for _ in histories]
        for row, history in enumerate(histories):
            for token in history:
                self.add(row, token)

    def add(self, row: int, token: int) -> None:
        tokens = self.tokens[row]
        tokens.append(token)
        if len(tokens) >= self.n:
            prefix = tuple(tokens[len(tokens) - self.n:-1])
            self.followers[row].setdefault(prefix, set()).add(token)

    def banned(self, row: int) -> set[int]:
        tokens = self.tokens[row]
        if len(tokens) < self.n - 1:
            return set()
        prefix = tuple(tokens[len(tokens) - self.n + 1:])
        return self.followers[row].get(prefix, set())


def apply_bans(scores: torch.Tensor, banned: Sequence[set[int] | Sequence[int]]) -> torch.Tensor:
    """Set the banned tokens of each row to -inf."""
    rows = [row for row, tokens in enumerate(banned) for _ in tokens]
    if not rows:
        return scores
    columns = [token for tokens in banned for token in tokens]
    scores = scores.clone()
    scores[torch.tensor(rows, device=scores.device), torch.tensor(columns, device=scores.device)] = float("-inf")
    return scores


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores / temperature


def apply_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the tokens scoring at least the k-th best score (ties at that score are all kept)."""
    k = min(k, scores.shape[-1])
    threshold = torch.topk(scores, k, dim=-1).values[:, -1:]
    return scores.masked_fill(scores < threshold, float("-inf"))


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probabilities add up to at least `top_p`.

    Sorted ascending, a token is dropped when the probability mass at or below it is at most
    1 - top_p; the best token always stays, so at least one survives.
    """
    ascending, order = torch.sort(scores, dim=-1)
    mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_below <= 1 - top_p
    drop_sorted[:, -1] = False
    drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def warp(scores: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Temperature, top-k, top-p: the sampling-only processors, each skipped when it is a no-op."""
    if settings.temperature != 1.0:
        scores = apply_temperature(scores, settings.temperature)
    if settings.top_k > 0 and settings.top_k < scores.shape[-1]:
        scores = apply_top_k(scores, settings.top_k)
    if settings.top_p < 1.0:
        scores = apply_top_p(scores, settings.top_p)
    return scores


# --- preparing prompts ----------------------------------------------------------------------------

def fit_prompt(ids: Sequence[int], context: int, max_new_tokens: int, eos_id: int) -> tuple[list[int], bool]:
    """The prompt the model will see, and whether it was cut.

    An empty prompt starts from end-of-text (what GPT-2 saw before every document). A prompt that
    leaves no room for `max_new_tokens` keeps its last tokens, but at least one.
    """
    if not ids:
        return [eos_id], False
    keep = max(1, context - max_new_tokens)
    if len(ids) > keep:
        return list(ids[-keep:]), True
    return list(ids), False


# --- the decode loop ------------------------------------------------------------------------------

def _choose(scores: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    if greedy:
        return scores.argmax(dim=-1)
    probabilities = scores.softmax(dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


@torch.inference_mode()
def generate(model: GPT2, prompts: Sequence[Sequence[int]], settings: SamplingSettings, eos_id: int,
             generator: torch.Generator | None = None, on_tokens: StepCallback | None = None, *,
             use_cache: bool = True, stop_at_eos: bool = True) -> list[list[int]]:
    """Continue each prompt; returns the new token ids of every output sequence.

    Sequences come out in the order prompt0-seq0, prompt0-seq1, ..., prompt1-seq0, ... with
    `settings.num_return_sequences` per prompt. End-of-text ends a sequence and is not returned.
    `on_tokens` is called after every step (see `StepCallback`), which lets a caller stream text.
    `use_cache=False` recomputes the whole sequence each step (for tests of the cached path);
    `stop_at_eos=False` always produces `max_new_tokens` (for benchmarks).
    """
    settings.validate()
    if not prompts:
        return []
    config = model.config
    context = config.n_positions
    device = model.transformer.wte.weight.device
    fitted = [fit_prompt(p, context, settings.max_new_tokens, eos_id)[0] for p in prompts]
    rows = [ids for ids in fitted for _ in range(settings.num_return_sequences)]
    batch = len(rows)
    lengths = [len(ids) for ids in rows]
    width = max(lengths)
    # The last sampled token is never fed back, so a full context still yields one more token.
    steps = min(settings.max_new_tokens, context - width + 1)
    padded = any(length != width for length in lengths)

    input_ids = torch.tensor([[eos_id] * (width - len(ids)) + ids for ids in rows], device=device)
    padding = prompt_positions = None
    if padded:
        # Left padding: every row's last prompt token sits in the last column. Position ids count
        # real tokens only, so a padded row sees the same positions as it would alone.
        total = min(width + steps, context)
        padding = torch.ones(batch, total, dtype=torch.long, device=device)
        for row, length in enumerate(lengths):
            padding[row, :width - length] = 0
        prompt_positions = (padding[:, :width].cumsum(-1) - 1).clamp(min=0)
        # For one query, build_mask(padding[:, :S], 1) is the key padding itself (the query is a real
        # token); slicing one precomputed mask avoids building one per step.
        step_mask = padding.bool()[:, None, None, :]
        next_positions = torch.tensor(lengths, device=device)[:, None]

    penalty = settings.repetition_penalty
    seen = seen_tokens(rows, config.vocab_size, device) if penalty != 1.0 else None
    bans = NGramBans(rows, settings.no_repeat_ngram_size) if settings.no_repeat_ngram_size > 0 else None

    def forward(ids: torch.Tensor, cache: KVCache | None, mask: torch.Tensor | None,
                positions: torch.Tensor | None) -> torch.Tensor:
        logits = model(ids, mask=mask, position_ids=positions, kv_cache=cache, last_token_only=True)
        return logits[:, -1, :].float()  # processors work in fp32 whatever the weights' dtype

    cache = None
    if use_cache:
        cache = KVCache(config, batch, min(width + steps, context), device, model.transformer.wte.weight.dtype)
    prefill_mask = build_mask(padding[:, :width], width) if padded else None
    scores = forward(input_ids, cache, prefill_mask, prompt_positions)
    sequence = input_ids  # only grown on the no-cache path

    outputs: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    finished_tensor = torch.zeros(batch, dtype=torch.bool, device=device) if stop_at_eos else None
    eos = torch.tensor(eos_id, device=device)
    for step in range(steps):
        if seen is not None:
            scores = apply_repetition_penalty(scores, seen, penalty)
        if bans is not None:
            scores = apply_bans(scores, [bans.banned(row) for row in range(batch)])
        if not settings.greedy:
            scores = warp(scores, settings)
        tokens = _choose(scores, settings.greedy, generator)
        if finished_tensor is not None:
            # Finished rows keep being fed end-of-text; their output is already closed.
            tokens = torch.where(finished_tensor, eos, tokens)
            finished_tensor |= tokens == eos
        new = tokens.tolist()
        reported: list[int | None] = []
        for row, token in enumerate(new):
            if finished[row] or (stop_at_eos and token == eos_id):
                finished[row] = True
                reported.append(None)
            else:
                outputs[row].append(token)
                reported.append(token)
        if on_tokens is not None:
            on_tokens(reported)
        if all(finished) or step == steps - 1:
            break
        if seen is not None:
            seen[torch.arange(batch, device=device), tokens] = True
        if bans is not None:
            for row, token in enumerate(new):
                bans.add(row, token)

        fed = tokens[:, None]
        if use_cache:
            mask = positions = None
            if padded:
                mask = step_mask[..., :width + step + 1]
                positions = next_positions + step
            scores = forward(fed, cache, mask, positions)
        else:
            sequence = torch.cat([sequence, fed], dim=1)
            mask = positions = None
            if padded:
                known = padding[:, :sequence.shape[1]]
                mask = build_mask(known, sequence.shape[1])
                positions = (known.cumsum(-1) - 1).clamp(min=0)
            scores = forward(sequence, None, mask, positions)
    return outputs


__all__ = [
    "NGramBans", "SamplingSettings", "StepCallback", "apply_bans", "apply_repetition_penalty", "apply_temperature",
    "apply_top_k", "apply_top_p", "fit_prompt", "generate", "seen_tokens", "warp",
]
