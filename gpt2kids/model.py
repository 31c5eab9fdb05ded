"""GPT-2, written out in full.

Module and parameter names are those of Hugging Face's `GPT2LMHeadModel`, so a state dict maps
one to one (`gpt2kids.hf` transposes the four Conv1D weights, which HF keeps as (in, out)).
Reads top to bottom: attention, MLP, block, the model, then the KV cache used for decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt2kids.config import TANH_GELU_NAMES, GPT2Config
from gpt2kids.loss import IGNORE_INDEX, linear_cross_entropy
from gpt2kids.ops import causal_attention, project


def dropout_or_identity(rate: float) -> nn.Module:
    # With rate 0 there is nothing to call: no kernel launch, no mask.
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


def activation(name: str) -> nn.Module:
    if name in TANH_GELU_NAMES:
        return nn.GELU(approximate="tanh")
    return {"gelu": nn.GELU(), "relu": nn.ReLU(), "silu": nn.SiLU(), "swish": nn.SiLU()}[name]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = dropout_or_identity(config.resid_pdrop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """Attention over `norm(x)` (the block passes its ln_1 so the pair can be fused in training)."""
        batch, length, width = x.shape
        # (B, T, 3C) -> three (B, H, T, D) views.
        qkv = project(self.c_attn, x, norm)
        q, k, v = qkv.view(batch, length, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_index, k, v)
        dropout = self.attn_pdrop if self.training else 0.0
        if mask is None and kv_cache is not None and kv_cache.length > 0 and length == 1:
            # One new token sees every cached key: no mask at all.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        elif mask is None and (kv_cache is None or kv_cache.length == 0):
            # The training path: causal attention with no mask in memory.
            y = causal_attention(q, k, v, dropout)
        else:
            if mask is None:
                raise ValueError("a multi-token forward after a filled KV cache needs a mask (see build_mask)")
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.resid_dropout(project(self.c_proj, y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width)
        self.act = activation(config.activation_function)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd)
        self.dropout = dropout_or_identity(config.resid_pdrop)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """The MLP of `norm(x)` (the block passes its ln_2)."""
        return self.dropout(project(self.c_proj, project(self.c_fc, x, norm), self.act))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, layer_index: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(x, mask, kv_cache, norm=self.ln_1)
        return x + self.mlp(x, norm=self.ln_2)


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=dropout_or_identity(config.embd_pdrop),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
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

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The final LayerNorm's output, (B, T, C)."""
        length = input_ids.shape[1]
        past = kv_cache.length if kv_cache is not None else 0
        if past + length > self.config.n_positions:
            raise ValueError(f"sequence of {past + length} tokens exceeds the context of "
                             f"{self.config.n_positions}")
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=input_ids.device).unsqueeze(0)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))
        for block in self.transformer.h:
            x = block(x, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += length
        return self.transformer.ln_f(x)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                reduction: str = "mean", position_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                last_token_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V), or with `targets` the token cross-entropy.

        `targets` are the next tokens, aligned with `input_ids` (the caller shifts), with
        IGNORE_INDEX (-100) where no loss is wanted. `reduction="sum"` returns the summed loss so a
        caller can normalise over all tokens of an accumulated batch. With targets the full logits
        are never materialised: the loss is computed in chunks (see gpt2kids.loss).
        """
        hidden = self.hidden_states(input_ids, position_ids, mask, kv_cache)
        if targets is not None:
            loss_sum, count = linear_cross_entropy(hidden, self.lm_head.weight, targets)
            if reduction == "sum":
                return loss_sum
            return loss_sum / count.clamp(min=1)
        if last_token_only:
            hidden = hidden[:, -1:, :]
        return self.lm_head(hidden)


class KVCache:
    """Keys and values of past tokens for every layer, preallocated to `max_length`.

    Preallocation means each decode step writes one slot instead of re-concatenating the whole
    history. `length` counts the filled positions; the model advances it after each forward.
    """

    def __init__(self, config: GPT2Config, batch_size: int, max_length: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        if max_length > config.n_positions:
            raise ValueError(f"KV cache of {max_length} exceeds the context of {config.n_positions}")
        shape = (batch_size, config.n_head, max_length, config.head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


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


__all__ = ["GPT2", "IGNORE_INDEX", "KVCache", "build_mask"]
