"""The decode loop behind `python generate.py`: prompts in, new tokens out, through a KV cache.

Prompts are left-padded into one batch, prefilled in one forward, then continued one token per step;
each sequence stops on its own at end-of-text (or at any other end id the model declares).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gpt2kids.errors import UserError
from gpt2kids.logits_processors import LogitsProcessors, SamplingSettings, choose
from gpt2kids.model import GPT2, KVCache, build_mask

# Called after each step with one entry per output row: the row's new token, or None when the row
# produced nothing (it had already finished, or it has just produced end-of-text).
StepCallback = Callable[[list[int | None]], None]
# (input ids, cache, mask, positions) -> the next token's fp32 logits: `next_token_logits` bound to a model,
# or the compiled step of `gpt2kids.compiled_decoding`.
DecodeStep = Callable[[torch.Tensor, KVCache, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def fit_prompt(ids: Sequence[int], context: int, max_new_tokens: int, eos_id: int) -> tuple[list[int], bool]:
    """The prompt the model will see, and whether it was cut.

    An empty prompt starts from end-of-text (what GPT-2 saw before every document). The last new token
    is never fed back, so P prompt tokens and N new ones take P + N - 1 positions. While N fits the
    context, a prompt that leaves no room for it keeps its last tokens (transformers' pipeline calls this
    "hole"), at least one. N beyond the context fits no prompt: the prompt keeps what fits of it, and
    generation stops when the context is full (cutting it to one token would continue something else).
    """
    if not ids:
        return [eos_id], False
    keep = context - max_new_tokens + 1 if max_new_tokens <= context else context
    return list(ids[-keep:]), len(ids) > keep


class PromptBatch:
    """Prompts left-padded to one width, so that every row's last prompt token is in the last column.

    Padded rows need a mask and position ids that count real tokens only, so a row sees exactly what
    it would see alone; a batch of equal lengths needs neither.
    """

    def __init__(self, rows: Sequence[Sequence[int]], pad_id: int, total_length: int,
                 device: torch.device) -> None:
        self.width = max(len(ids) for ids in rows)
        self.input_ids = torch.tensor([[pad_id] * (self.width - len(ids)) + list(ids) for ids in rows], device=device)
        self.padded = any(len(ids) != self.width for ids in rows)
        if self.padded:
            self.key_padding = torch.ones(len(rows), total_length, dtype=torch.long, device=device)
            for row, ids in enumerate(rows):
                self.key_padding[row, :self.width - len(ids)] = 0
            self.lengths = torch.tensor([len(ids) for ids in rows], device=device)[:, None]

    def prefill_inputs(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(mask, position ids) for the prompts."""
        if not self.padded:
            return None, None
        known = self.key_padding[:, :self.width]
        return build_mask(known, self.width), (known.cumsum(-1) - 1).clamp(min=0)

    def step_inputs(self, step: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(mask, position ids) for the token fed after decode step `step` (one query: its key padding)."""
        if not self.padded:
            return None, None
        return self.key_padding.bool()[:, None, None, :self.width + step + 1], self.lengths + step


def next_token_logits(model: GPT2, input_ids: torch.Tensor, cache: KVCache, mask: torch.Tensor | None,
                      positions: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits of the token after the last one of each row (the processors work in fp32)."""
    hidden = model.hidden_states(input_ids, positions, mask, cache)
    return model.lm_head(hidden[:, -1]).float()


def next_token_scores(model: GPT2, input_ids: torch.Tensor, cache: KVCache, mask: torch.Tensor | None,
                      positions: torch.Tensor | None, step: DecodeStep | None = None) -> torch.Tensor:
    """`next_token_logits` (or `step`'s), checked to be finite."""
    if step is None:
        scores = next_token_logits(model, input_ids, cache, mask, positions)
    else:
        scores = step(input_ids, cache, mask, positions)
    if not bool(scores.sum().isfinite()):  # one sum, not a check per score: a decode step does it
        raise UserError("the model computed scores that are not finite (NaN or infinity): its weights are damaged, "
                        "or its activations overflow in this precision; try --precision fp32")
    return scores


@torch.inference_mode()
def generate(model: GPT2, prompts: Sequence[Sequence[int]], settings: SamplingSettings, eos_id: int,
             generator: torch.Generator | None = None, on_tokens: StepCallback | None = None, *,
             stop_at_eos: bool = True, more_end_ids: Sequence[int] = ()) -> list[list[int]]:
    """Continue each prompt; returns the new token ids of every output sequence, end-of-text left out.

    A sequence ends at `eos_id` or at any of `more_end_ids` (a model whose generation_config.json lists
    several, as transformers' `generate` stops at any of them); the end token is left out either way.

    Sequences come out in the order prompt0-seq0, prompt0-seq1, ..., prompt1-seq0, ... with
    `settings.num_return_sequences` per prompt. `on_tokens` is called after every step (see `StepCallback`),
    which lets a caller stream text. `stop_at_eos=False` always produces `max_new_tokens` (for benchmarks).
    """
    settings.validate()
    if not prompts:
        return []
    config = model.config
    context = config.n_positions
    device = model.transformer.wte.weight.device
    rows = [fit_prompt(p, context, settings.max_new_tokens, eos_id)[0]
            for p in prompts for _ in range(settings.num_return_sequences)]
    width = max(len(ids) for ids in rows)
    # The last sampled token is never fed back, so a full context still yields one more token.
    steps = min(settings.max_new_tokens, context - width + 1)
    total_length = min(width + steps, context)
    batch = PromptBatch(rows, eos_id, total_length, device)
    cache_dtype = getattr(model, "kv_cache_dtype", model.transformer.wte.weight.dtype)  # see hold_kv_cache_in
    cache = KVCache(config, len(rows), total_length, device, cache_dtype)
    processors = LogitsProcessors(settings, rows, config.vocab_size, device)
    decode_step = getattr(model, "compiled_decode_step", None)  # see gpt2kids.compiled_decoding
    end_ids = torch.tensor(sorted({eos_id, *more_end_ids}), device=device)

    scores = next_token_scores(model, batch.input_ids, cache, *batch.prefill_inputs())
    outputs: list[list[int]] = [[] for _ in rows]
    finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
    for step in range(steps):
        tokens = choose(processors(scores), settings.greedy, generator)
        if stop_at_eos:
            tokens = torch.where(finished, eos_id, tokens)  # finished rows are fed end-of-text; nothing is reported
            finished |= torch.isin(tokens, end_ids)
        reported = [None if done else token for token, done in zip(tokens.tolist(), finished.tolist(), strict=True)]
        for output, token in zip(outputs, reported, strict=True):
            if token is not None:
                output.append(token)
        if on_tokens is not None:
            on_tokens(reported)
        if step == steps - 1 or all(token is None for token in reported):
            break
        processors.add(tokens)
        scores = next_token_scores(model, tokens[:, None], cache, *batch.step_inputs(step), decode_step)
    return outputs
