"""`python generate.py --compile`: the decode step compiled by `torch.compile`, its weights frozen in.

A decode step multiplies one row per sequence by every weight. With the weights frozen into the
graph as constants, inductor's C++ GEMM template can lay each one out for those products, and
max-autotune times its kernels against ATen's on this machine while compiling, keeping the faster.
The compile comes when the model loads, so it is for long sessions (`--serve`, `--interactive`, large
prompt files). Only one-token steps run compiled; the prompt's forward stays eager, and so does
everything after the logits (sampling, the finite check).
"""

from __future__ import annotations

import math
import sys
import time
import warnings

import torch

from gpt2kids.decode_loop import next_token_logits
from gpt2kids.decoding_kernels import (
    AttentionShape,
    WideCacheAttention,
    choose_kernels,
    hold_kv_cache_in,
    kv_cache_dtype,
)
from gpt2kids.errors import UserError
from gpt2kids.model import GPT2, KVCache

# The C++ GEMM template needs the weights as constants (freezing); ATen stays a candidate.
CPU_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
# Autotuning writes its tables of candidates to stderr (dozens of lines on a cold cache), where generate.py
# keeps its own few lines; options this torch does not have are left out.
QUIET_AUTOTUNING = {"autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
GPU_OPTIONS = {"freezing": True}
WARM_UP_PROMPT = 2  # cached tokens when compiling: not 0 or 1, which torch.compile would specialise on
WARM_UP_ROOM = 8  # the warm-up's cache has room to spare, as a decode step's has


class OneQueryAttention(WideCacheAttention):
    """Attention with one query per row written out as products, a softmax and a sum over the cache, which
    inductor turns into loops over the keys (SDPA is one opaque call, slower for a single query on CPU);
    the query is cast to the KV cache's dtype and the result back, as in `WideCacheAttention`."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if q.shape[2] != 1:  # the prompt's forward
            return super().attention(q, k, v, mask)
        scores = (q.to(k.dtype) * k).sum(-1) / math.sqrt(k.shape[-1])  # (B, H, S)
        if mask is not None:  # (B, 1, 1, S): the keys each row may see
            scores = scores.masked_fill(~mask[:, :, 0], float("-inf"))
        return (scores.softmax(-1)[..., None] * v).sum(-2, keepdim=True).to(q.dtype)


def compile_decode_step(model: GPT2) -> GPT2:
    """Compile `model`'s one-token decode step now (for batch 1; another batch size compiles on first use)
    and have `generate` use it (`model.compiled_decode_step`); returns the model in eval mode."""
    import torch._inductor.config  # here, not at the top: generate.py without --compile never loads inductor

    model.eval()  # decoding only: no dropout
    device = model.transformer.wte.weight.device
    options = CPU_OPTIONS if device.type == "cpu" else GPU_OPTIONS
    options = {**options, **{key: value for key, value in QUIET_AUTOTUNING.items()
                             if hasattr(torch._inductor.config, key)}}
    dtype = model.transformer.wte.weight.dtype
    if device.type == "cpu":  # the KV cache's dtype, by the measurement optimize_for_decoding makes too
        attention = AttentionShape(model.config.n_head, model.config.head_dim)
        hold_kv_cache_in(model, kv_cache_dtype(choose_kernels({attention: model.config.n_layer}, dtype)[attention]))
        for block in model.transformer.h:
            block.attn.__class__ = OneQueryAttention  # a subclass that only computes: the module keeps its state

    def step(input_ids: torch.Tensor, cache: KVCache, mask: torch.Tensor | None,
             positions: torch.Tensor | None) -> torch.Tensor:
        return next_token_logits(model, input_ids, cache, mask, positions)

    compiled = torch.compile(step, dynamic=True)  # the cache's length varies from step to step

    def compiled_step(input_ids: torch.Tensor, cache: KVCache, mask: torch.Tensor | None,
                      positions: torch.Tensor | None) -> torch.Tensor:
        if cache.length + input_ids.shape[1] == cache.layers[0].keys.shape[2]:
            # The step that fills the cache (only at the end of the context) would be another graph, whose
            # whole-cache views are contiguous: not worth a compile, it runs eager.
            return next_token_logits(model, input_ids, cache, mask, positions)
        # Dynamo decides whether to freeze the weights while tracing, and any call may trace (a new batch
        # size): the options hold around every call (torch.compile's own `options` come too late).
        with torch._inductor.config.patch(options):
            return compiled(input_ids, cache, mask, positions)

    start = time.perf_counter()
    print(f"compiling the decode step on {device} (a minute or so the first time)", file=sys.stderr, flush=True)
    with torch.inference_mode():
        room = min(WARM_UP_PROMPT + WARM_UP_ROOM, model.config.n_positions)
        cache = KVCache(model.config, 1, room, device, getattr(model, "kv_cache_dtype", dtype))
        next_token_logits(model, torch.zeros(1, WARM_UP_PROMPT, dtype=torch.long, device=device), cache, None, None)
        token = torch.zeros(1, dtype=torch.long, device=device)
        try:
            with warnings.catch_warnings():  # inductor's own deprecation notices say nothing to a user
                warnings.simplefilter("ignore", UserWarning)
                compiled_step(token[:, None], cache, None, None)  # as generate feeds tokens: its strides too
        except Exception as error:  # e.g. no C++ compiler: inductor's own message is pages long
            summary = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise UserError(f"--compile failed ({summary}); run without --compile (inductor on CPU needs a C++ "
                            "compiler such as g++)") from None
    print(f"compiled the decode step in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    model.compiled_decode_step = compiled_step
    return model
