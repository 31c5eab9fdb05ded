"""Sampling settings and the logits processors of `python generate.py`.

Each processor is a pure function over (B, V) float32 scores, tested to give the scores of its
transformers counterpart. `LogitsProcessors` applies them in transformers' order (repetition penalty,
no-repeat n-gram, then when sampling temperature, top-k, top-p), skipping those that would change nothing;
`choose` then takes the best token or draws one (`draw`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt2kids.errors import UserError


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
        if not self.greedy and not 0 < self.temperature < math.inf:
            raise UserError(f"--temperature must be a finite number above 0, got {self.temperature}; "
                            "for deterministic argmax decoding pass --greedy")
        if self.top_k < 0:
            raise UserError(f"--top-k must be 0 (off) or more, got {self.top_k}")
        if not 0 < self.repetition_penalty < math.inf:
            raise UserError(f"--repetition-penalty must be a finite number above 0 (1 turns it off), got "
                            f"{self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise UserError(f"--no-repeat-ngram-size must be 0 (off) or more, got {self.no_repeat_ngram_size}")
        if self.num_return_sequences < 1:
            raise UserError(f"--num-return-sequences must be at least 1, got {self.num_return_sequences}")


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise each token in `seen` (a (B, V) bool mask of the row's history) once.

    Negative scores are multiplied and positive ones divided, so a penalty above 1 always lowers them.
    """
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def seen_tokens(histories: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """The (B, V) bool mask `apply_repetition_penalty` takes, built from token-id lists."""
    seen = torch.zeros(len(histories), vocab_size, dtype=torch.bool, device=device)
    for row, history in enumerate(histories):
        seen[row, list(history)] = True
    return seen


class NGramBans:
    """Per row, the next tokens that would complete an n-gram already in that row.

    Kept incrementally: each new token records one n-gram, so a step never rescans the history.
    """

    def __init__(self, histories: Sequence[Sequence[int]], n: int) -> None:
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


def apply_bans(scores: torch.Tensor, banned: Sequence[set[int]]) -> torch.Tensor:
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

    Sorted ascending, a token goes when the mass at or below it is at most 1 - top_p; the best always stays.
    """
    ascending, order = torch.sort(scores, dim=-1)
    drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    drop_sorted[:, -1] = False
    drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


class LogitsProcessors:
    """The processors `settings` asks for, with the per-row history they need (prompt and new tokens)."""

    def __init__(self, settings: SamplingSettings, histories: Sequence[Sequence[int]], vocab_size: int,
                 device: torch.device | str) -> None:
        self.settings = settings
        self.seen = seen_tokens(histories, vocab_size, device) if settings.repetition_penalty != 1.0 else None
        self.bans = NGramBans(histories, settings.no_repeat_ngram_size) if settings.no_repeat_ngram_size > 0 else None

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        settings = self.settings
        if self.seen is not None:
            scores = apply_repetition_penalty(scores, self.seen, settings.repetition_penalty)
        if self.bans is not None:
            scores = apply_bans(scores, [self.bans.banned(row) for row in range(scores.shape[0])])
        if settings.greedy:
            return scores
        if settings.temperature != 1.0:
            scores = apply_temperature(scores, settings.temperature)
        if 0 < settings.top_k < scores.shape[-1]:
            scores = apply_top_k(scores, settings.top_k)
        if settings.top_p < 1.0:
            scores = apply_top_p(scores, settings.top_p)
        return scores

    def add(self, tokens: torch.Tensor) -> None:
        """Record each row's new token (a (B,) tensor) in the histories."""
        if self.seen is not None:
            self.seen[torch.arange(tokens.shape[0], device=tokens.device), tokens] = True
        if self.bans is not None:
            for row, token in enumerate(tokens.tolist()):
                self.bans.add(row, token)


def choose(scores: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row: the best, or drawn from softmax(scores)."""
    if greedy:
        return scores.argmax(dim=-1)
    return draw(scores.softmax(dim=-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` (B, V), drawn with probability `probs`.

    The race torch.multinomial runs for one sample: the largest p / q, q ~ Exp(1) per token. Run over
    the whole vocabulary, its draws take most of a sampled step's time outside the model; here it runs
    only among the tokens the processors kept (top-k keeps 50 of 50257) when they are at most a fifth
    of it, which leaves the distribution as it is: a token of probability 0 never wins.
    """
    indices = None
    kept_per_row = (probs > 0).sum(dim=-1)  # NaN counts as nothing: scores that overflowed to inf leave NaN
    if int(kept_per_row.min()) == 0:
        raise UserError("the sampling settings leave no token to draw: the scores overflowed (an extreme "
                        "--temperature or --repetition-penalty); use values nearer 1")
    kept = int(kept_per_row.max())
    if kept * 5 <= probs.shape[-1]:  # keeping more, topk would cost more than the race over every token
        probs, indices = probs.topk(kept, dim=-1)
    race = probs / torch.empty_like(probs).exponential_(generator=generator)
    winners = race.argmax(dim=-1, keepdim=True)
    return (indices.gather(1, winners) if indices is not None else winners).squeeze(1)
