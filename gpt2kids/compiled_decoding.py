"""`python generate.py --compile`: the decode step compiled by `torch.compile`, its weights frozen in.

A decode step multiplies one row per sequence by every weight. With the weights frozen into the
graph as constants, inductor's C++ GEMM template can lay each one out for those products, and
max-autotune times its kernels against ATen's on this machine while compiling, keeping the faster.
It costs a compile (tens of seconds on a small CPU) when the model loads, so it is for long sessions:
`--serve`, `--interactive`, large prompt files. Only one-token steps run compiled; the prompt's
forward stays eager, and so does everything after the logits (sampling, the finite check).
"""

from __future__ import annotations

import sys
import time

import torch

from gpt2kids.decode_loop import next_token_logits
from gpt2kids.decoding_kernels import AttentionShape, choose_kernels, hold_kv_cache_in
from gpt2kids.device import DTYPES
from gpt2kids.errors import UserError
from gpt2kids.model import GPT2, KVCache

# The C++ GEMM template needs the weights as constants (freezing); ATen stays a candidate.
CPU_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
GPU_OPTIONS = {"freezing": True}
WARM_UP_PROMPT = 2  # cached tokens when compiling: not 0 or 1, which torch.compile would specialise on


def compile_decode_step(model: GPT2) -> GPT2:
    """Compile `model`'s one-token decode step now (for batch 1; another batch size compiles on first use)
    and have `generate` use it (`model.compiled_decode_step`); returns the model in eval mode."""
    model.eval()  # decoding only: no dropout
    device = model.transformer.wte.weight.device
    options = CPU_OPTIONS if device.type == "cpu" else GPU_OPTIONS
    dtype = model.transformer.wte.weight.dtype
    if device.type == "cpu":  # the KV cache's dtype, by the measurement optimize_for_decoding makes too
        attention = AttentionShape(model.config.n_head, model.config.head_dim)
        kernels = choose_kernels({attention: model.config.n_layer}, dtype)[attention]  # "ONE/MORE": dtype names
        hold_kv_cache_in(model, DTYPES[kernels.split("/")[0]])

    def step(input_ids: torch.Tensor, cache: KVCache, mask: torch.Tensor | None,
             positions: torch.Tensor | None) -> torch.Tensor:
        return next_token_logits(model, input_ids, cache, mask, positions)

    compiled = torch.compile(step, dynamic=True)  # the cache's length varies from step to step

    def compiled_step(input_ids: torch.Tensor, cache: KVCache, mask: torch.Tensor | None,
                      positions: torch.Tensor | None) -> torch.Tensor:
        # Dynamo decides whether to freeze the weights while tracing, and any call may trace (a new batch
        # size): the options hold around every call (torch.compile's own `options` come too late).
        with torch._inductor.config.patch(options):
            return compiled(input_ids, cache, mask, positions)

    start = time.perf_counter()
    print(f"compiling the decode step on {device} (a minute or so the first time)", file=sys.stderr, flush=True)
    with torch.inference_mode():
        cache = KVCache(model.config, 1, WARM_UP_PROMPT + 1, device, getattr(model, "kv_cache_dtype", dtype))
        ids = torch.zeros(1, WARM_UP_PROMPT, dtype=torch.long, device=device)
        next_token_logits(model, ids, cache, None, None)
        try:
            compiled_step(ids[:, :1], cache, None, None)
        except Exception as error:  # e.g. no C++ compiler: inductor's own message is pages long
            summary = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise UserError(f"--compile failed ({summary}); run without --compile (inductor on CPU needs a C++ "
                            "compiler such as g++)") from None
    print(f"compiled the decode step in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    model.compiled_decode_step = compiled_step
    return model
