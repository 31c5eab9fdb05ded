"""GPT-2, written out in full.

Module and parameter names are those of Hugging Face's `GPT2LMHeadModel`, so a state dict maps one
to one (`gpt2kids.hf` transposes the four Conv1D weights, which HF keeps as (in, out)). Reads top
to bottom: attention, MLP, block, the model, then the KV cache used for decoding. Speed and memory
tricks are not here: `gpt2kids.memory_saving` and `gpt2kids.decoding_kernels` apply them to a built
model without changing its parameters or what it computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt2kids.config import ACTIVATIONS, GPT2Config

IGNORE_INDEX = -100  # a target that carries no loss (padding, the last position of a block)
TIED_WEIGHT = "lm_head.weight"  # the LM head is the token embedding: saved once, as wte


def dropout_or_identity(rate: float) -> nn.Module:
    # With rate 0 there is nothing to call: no kernel launch, no mask.
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = dropout_or_identity(config.resid_pdrop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        # (B, T, C) -> (B, H, T, D)
        q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        y = self.attention(q, k, v, mask)
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.resid_dropout(self.c_proj(y))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q kᵀ / sqrt(D)) v. Without a mask, causal: query i sees keys 0..i.

        A mask is needed whenever queries and keys are not aligned (several new tokens after a filled
        KV cache); one new token sees every cached key, so it needs none.
        """
        queries, keys = q.shape[2], k.shape[2]
        if mask is None and 1 < queries != keys:
            raise ValueError("several queries after a filled KV cache need a mask (see build_mask)")
        dropout = self.attn_pdrop if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=mask is None and queries > 1)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width)
        self.act = ACTIVATIONS[config.activation_function]()
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd)
        self.dropout = dropout_or_identity(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=dropout_or_identity(config.embd_pdrop),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Each block adds two residual branches; scaling keeps the residual stream's variance flat.
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for block in self.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields the tied weight once

    def untied_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict as files store it: without `lm_head.weight`, which is `transformer.wte.weight`."""
        return {key: value for key, value in self.state_dict().items() if key != TIED_WEIGHT}

    def load_untied_state_dict(self, state: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Load what `untied_state_dict` gives (every other key must be there), and keep the head tied."""
        result = self.load_state_dict(state, strict=False, assign=assign)
        missing = set(result.missing_keys) - {TIED_WEIGHT}
        if missing or result.unexpected_keys:
            raise ValueError(f"state dict does not fit the model: missing {sorted(missing)[:4]}, "
                             f"unexpected {sorted(result.unexpected_keys)[:4]}")
        self.lm_head.weight = self.transformer.wte.weight  # assign=True replaces the Parameter objects

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The final LayerNorm's output, (B, T, C).

        `position_ids` default to the positions after what `kv_cache` holds; `mask` is a boolean
        (B, 1, T, S) attention mask (see `build_mask`), needed for padded batches.
        """
        past = kv_cache.length if kv_cache is not None else 0
        length = input_ids.shape[1]
        if past + length > self.config.n_positions:
            raise ValueError(f"sequence of {past + length} tokens exceeds the context of {self.config.n_positions}")
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=input_ids.device).unsqueeze(0)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))
        for index, block in enumerate(self.transformer.h):
            x = block(x, mask, kv_cache.layers[index] if kv_cache is not None else None)
        return self.transformer.ln_f(x)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *, reduction: str = "mean",
                position_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V), or with `targets` the token cross-entropy.

        `targets` are the next tokens, aligned with `input_ids` (the caller shifts), IGNORE_INDEX where
        no loss is wanted. `reduction="sum"` gives the summed loss, so a caller can divide by the token
        count of a whole accumulated batch.
        """
        hidden = self.hidden_states(input_ids, position_ids, mask, kv_cache)
        if targets is None:
            return self.lm_head(hidden)
        return self.loss(hidden, targets, reduction)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction=reduction)


class LayerKVCache:
    """One layer's keys and values, preallocated to the longest sequence; advances as it is filled."""

    def __init__(self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype) -> None:
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, H, T, D) keys and values; return all of them so far."""
        end = self.length + k.shape[2]
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Keys and values of past tokens for every layer.

    Preallocation means each decode step writes one slot instead of re-concatenating the history.
    """

    def __init__(self, config: GPT2Config, batch_size: int, max_length: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        if max_length > config.n_positions:
            raise ValueError(f"KV cache of {max_length} exceeds the context of {config.n_positions}")
        shape = (batch_size, config.n_head, max_length, config.head_dim)
        self.layers = [LayerKVCache(shape, device, dtype) for _ in range(config.n_layer)]

    @property
    def length(self) -> int:
        """Positions filled (the same in every layer between forwards)."""
        return self.layers[-1].length


def build_mask(key_padding: torch.Tensor, query_length: int) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, S) for the last `query_length` of S positions.

    `key_padding` is (B, S) with 1 for real tokens and 0 for (left) padding. A query sees the keys at
    or before its own position that are not padding. A padding query still sees itself, so no row is
    fully masked (a fully masked softmax row would be NaN).
    """
    total = key_padding.shape[1]
    device = key_padding.device
    query_positions = torch.arange(total - query_length, total, device=device)[:, None]
    key_positions = torch.arange(total, device=device)[None, :]
    causal = key_positions <= query_positions  # (T, S)
    mask = causal[None] & key_padding.bool()[:, None, :]
    mask |= key_positions == query_positions  # the diagonal
    return mask[:, None]


__all__ = ["GPT2", "IGNORE_INDEX", "TIED_WEIGHT", "KVCache", "build_mask"]
