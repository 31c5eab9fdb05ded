"""Training kernels that keep less memory than the plain modules would, with the same arithmetic.

`gpt2kids.model` calls two functions from here:

- `project(linear, x, pre)`: `linear(pre(x))` for a LayerNorm or activation `pre`, which in eager
  training saves only `x` and the parameters for the backward (see `RecomputingLinear`);
- `causal_attention(q, k, v, dropout)`: SDPA with `is_causal=True`, except for CPU training with
  dropout, where SDPA falls back to a slow, memory-hungry math path (see `CausalDropoutAttention`).

Without gradients (evaluation, decoding) and under torch.compile both are the plain PyTorch calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class RecomputingLinear(torch.autograd.Function):
    """`linear(pre(x))` in the compute dtype, saving for the backward only `x` and the parameters.

    The plain modules under autocast keep more until the backward: the bf16 copy of every weight
    (autocast caches it for the whole forward, and linear's backward saves it: 162 MB for GPT-2
    Small, all of it alive at the LM head, where training memory peaks), and the linear's input
    `pre(x)` beside `x`, which `pre`'s own backward keeps anyway. Here the weight is cast again in
    the backward and `pre` (ln_1 before c_attn, ln_2 before c_fc, the GELU before mlp.c_proj) is
    recomputed from `x`: per 1024 tokens of GPT-2 Small in bf16, 36 MB of LayerNorm outputs and
    72 MB of GELU outputs less, for the price of recomputing those elementwise ops. The casts and
    matmuls are the ones autocast makes, so losses and gradients come out the same as with the
    plain modules (bit for bit, in our CPU checks, fp32 and bf16).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                pre: Callable[..., torch.Tensor] | None, *pre_params: torch.Tensor) -> torch.Tensor:
        # Autocast off: the casts below are the ones it would make, minus its cache of the weight.
        with torch.autocast(x.device.type, enabled=False):
            inputs = (pre(x, *pre_params) if pre is not None else x).to(dtype)
            y = F.linear(inputs, weight.to(dtype), bias.to(dtype) if bias is not None else None)
        ctx.save_for_backward(x if pre is not None else inputs, weight, *pre_params)
        ctx.pre = pre
        ctx.dtype = dtype
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        x, weight, *pre_params = ctx.saved_tensors
        pre, dtype = ctx.pre, ctx.dtype
        want_weight, want_bias = ctx.needs_input_grad[1:3]
        want_pre = [ctx.needs_input_grad[0], *ctx.needs_input_grad[5:]]  # x, then pre's parameters
        with torch.autocast(x.device.type, enabled=False):
            if pre is not None:
                with torch.enable_grad():
                    pre_inputs = [t.detach().requires_grad_(want)
                                  for t, want in zip([x, *pre_params], want_pre, strict=True)]
                    pre_out = pre(*pre_inputs)
                inputs = pre_out.detach().to(dtype)
            else:
                inputs = x
            grad_y = grad_y.to(dtype)
            grad_rows = grad_y.reshape(-1, grad_y.shape[-1])
            grad_inputs = grad_y @ weight.to(dtype) if any(want_pre) else None
            grad_weight = grad_rows.t() @ inputs.reshape(-1, inputs.shape[-1]) if want_weight else None
            grad_bias = grad_rows.sum(0) if want_bias and ctx.has_bias else None
            pre_grads: list[torch.Tensor | None] = [grad_inputs, *[None] * len(pre_params)]
            if pre is not None and grad_inputs is not None:
                wanted = [t for t, want in zip(pre_inputs, want_pre, strict=True) if want]
                found = iter(torch.autograd.grad(pre_out, wanted, grad_inputs.to(pre_out.dtype)))
                pre_grads = [next(found) if want else None for want in want_pre]
        # Autograd casts each gradient to its input's dtype (fp32 for the weights), as autocast's backward does.
        return pre_grads[0], grad_weight, grad_bias, None, None, *pre_grads[1:]


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, weight.shape, weight, bias, eps)


def project(layer: nn.Linear, x: torch.Tensor, pre: nn.Module | None = None) -> torch.Tensor:
    """`layer(pre(x))`, where `pre` is a LayerNorm, an activation or nothing.

    In eager training this goes through `RecomputingLinear`, which keeps less for the backward. Under
    torch.compile the plain modules are traced instead: the compiler's own partitioner already
    recomputes cheap elementwise work rather than saving it, and traces them without graph breaks.
    """
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return layer(pre(x) if pre is not None else x)
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    if isinstance(pre, nn.LayerNorm):
        function = functools.partial(_layer_norm, eps=pre.eps)
        return RecomputingLinear.apply(x, layer.weight, layer.bias, dtype, function, pre.weight, pre.bias)
    return RecomputingLinear.apply(x, layer.weight, layer.bias, dtype, pre)


# Queries per block in `CausalDropoutAttention`: its temporaries are (B, H, block, T) in fp32.
ATTENTION_BLOCK = 64


class CausalDropoutAttention(torch.autograd.Function):
    """Causal attention with dropout on the probabilities, computed by blocks of queries (CPU training).

    SDPA's CPU flash kernel has no dropout, so with dropout_p > 0 PyTorch falls back to its math
    path: it materialises the (B, H, T, T) scores, probabilities and dropout mask, keeps them for the
    backward (a training step of GPT-2 Small at 4 x 512 tokens peaked 1.7 GB higher) and computes the
    masked-out half too. With GPT-2's dropout of 0.1, forward and backward of (4, 12, T, 64) bf16
    attention took 3.8x (T = 512) and 5.8x (T = 1024) as long as without dropout; this function takes
    1.3x and 2.4x. Here each block of queries meets only the keys at or before it and keeps
    only its dropout mask (one byte per causal entry) and log-normaliser; the backward recomputes
    the probabilities from those. As in the flash kernels, the scores and the softmax are fp32 (a bf16
    QKᵀ rounded to bf16 gave ~4x the flash kernel's error) and the other matmuls run in the inputs' dtype.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        # Contiguous once: slices of the permuted c_attn output would be copied again for every block.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        q_scores, k_scores = q.float(), k.float()  # no copies in fp32; transient ones in bf16
        batch, heads, length, head_dim = q.shape
        scale = head_dim ** -0.5
        # Laid out (B, T, H, D) like SDPA's output, so the caller's transpose back to (B, T, C) is a view.
        out = q.new_empty(batch, length, heads, head_dim).transpose(1, 2)
        log_normaliser = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        drops = []
        with torch.autocast(q.device.type, enabled=False):
            for start in range(0, length, ATTENTION_BLOCK):
                end = min(start + ATTENTION_BLOCK, length)
                scores = _block_scores(q_scores, k_scores, start, end, scale)
                block_normaliser = torch.logsumexp(scores, dim=-1)
                probs = scores.sub_(block_normaliser[..., None]).exp_()
                # From the global generator, so checkpointed RNG states replay it exactly; uniform draws
                # compared with p cost half of what bernoulli_ does on CPU.
                drop = torch.rand(probs.shape, device=q.device) < p
                kept = probs.masked_fill_(drop, 0.0).mul_(1.0 / (1.0 - p))
                out[:, :, start:end] = kept.to(q.dtype) @ v[:, :, :end]
                log_normaliser[:, :, start:end] = block_normaliser
                drops.append(drop)
        ctx.save_for_backward(q, k, v, out, log_normaliser, *drops)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        q, k, v, out, log_normaliser, *drops = ctx.saved_tensors
        length, scale, rescale = q.shape[2], q.shape[3] ** -0.5, 1.0 / (1.0 - ctx.p)
        grad_out = grad_out.to(q.dtype)
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        # The matmuls that feed the softmax and its gradient in fp32, as in the forward.
        q_scores, k_scores, v_scores, grad_out_scores = q.float(), k.float(), v.float(), grad_out.float()
        # Softmax backward needs rowsum(probs * d probs), which with dropout still equals rowsum(grad_out * out).
        delta = (grad_out_scores * out.float()).sum(dim=-1)
        with torch.autocast(q.device.type, enabled=False):
            for index, start in enumerate(range(0, length, ATTENTION_BLOCK)):
                end = min(start + ATTENTION_BLOCK, length)
                drop, grad_block = drops[index], grad_out[:, :, start:end]
                scores = _block_scores(q_scores, k_scores, start, end, scale)
                probs = scores.sub_(log_normaliser[:, :, start:end, None]).exp_()
                kept = probs.masked_fill(drop, 0.0).mul_(rescale)
                grad_v[:, :, :end] += kept.to(v.dtype).transpose(-2, -1) @ grad_block
                del kept
                grad_probs = grad_out_scores[:, :, start:end] @ v_scores[:, :, :end].transpose(-2, -1)
                grad_probs.masked_fill_(drop, 0.0).mul_(rescale).sub_(delta[:, :, start:end, None])
                grad_scores = probs.mul_(grad_probs).mul_(scale).to(q.dtype)
                del grad_probs
                grad_q[:, :, start:end] = grad_scores @ k[:, :, :end]
                grad_k[:, :, :end] += grad_scores.transpose(-2, -1) @ q[:, :, start:end]
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None


def _block_scores(q: torch.Tensor, k: torch.Tensor, start: int, end: int, scale: float) -> torch.Tensor:
    """Scaled scores (fp32 q, k) of queries start:end against keys 0:end, -inf where a key lies in the future."""
    scores = (q[:, :, start:end] @ k[:, :, :end].transpose(-2, -1)).mul_(scale)
    # Only the square of keys start:end can lie in the future of these queries.
    future = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu_(1)
    scores[..., start:end].masked_fill_(future, float("-inf"))
    return scores


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Causal self-attention of (B, H, T, D) queries, keys and values, with dropout on the probabilities."""
    if dropout > 0 and q.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return CausalDropoutAttention.apply(q, k, v, dropout)
    # Flash / memory-efficient kernels: no mask in memory.
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
