"""Kernels that train with less memory, applied to a built model; what it computes stays the same.

`use_memory_saving_kernels(model)` keeps every parameter, its name and its value, and changes only
what is kept for the backward:

- `RecomputingLinear`: LayerNorm -> Linear and GELU -> Linear, saving only the input;
- `CausalDropoutAttention`: causal attention with dropout by blocks of queries (CPU training);
- `gpt2kids.loss.linear_cross_entropy`: the LM head and its loss in chunks of tokens;
- `TiedEmbedding`: on CPU, the token embedding's weight gradient added into the tied LM head's.

Without gradients (evaluation, sampling) and under torch.compile the modules compute through the
plain PyTorch calls, so the compiler sees the textbook graph; the chunked loss runs as written (see
`linear_cross_entropy`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gpt2kids.loss import compute_dtype, linear_cross_entropy
from gpt2kids.model import GPT2, Block, CausalSelfAttention, LayerKVCache


class RecomputingLinear(torch.autograd.Function):
    """`linear(pre(x))` in the compute dtype, saving for the backward only `x` and the parameters.

    The plain modules under autocast keep more until the backward: the low-precision copy of every
    weight (autocast caches it for the whole forward, and linear's backward saves it), and the
    Linear's input `pre(x)` beside `x`, which `pre`'s own backward keeps anyway. Here the weight is
    cast again in the backward and `pre` is recomputed from `x`, for the price of recomputing an
    elementwise op. The casts and matmuls are the ones autocast makes, in the same order, so losses
    and gradients are those of the plain modules, bit for bit (tests/test_memory_saving.py).
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


# Queries per block in `CausalDropoutAttention`: its temporaries are (B, H, block, T) in fp32.
ATTENTION_BLOCK = 64


class CausalDropoutAttention(torch.autograd.Function):
    """Causal attention with dropout on the probabilities, computed by blocks of queries (CPU training).

    SDPA's CPU flash kernel has no dropout, so with dropout_p > 0 PyTorch falls back to its math
    path: it materialises the (B, H, T, T) scores, probabilities and dropout mask, keeps them for the
    backward and computes the masked-out half too. Here each block of queries meets only the keys at
    or before it and keeps only its dropout mask (one byte per causal entry) and log-normaliser; the
    backward recomputes the probabilities from those. As in the flash kernels, the scores and the
    softmax are fp32 and the other matmuls run in the inputs' dtype.
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
                # compared with p: cheaper than bernoulli_ on CPU.
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


class TiedEmbedding(torch.autograd.Function):
    """The token embedding's look-up, its weight gradient added into the tied LM head's.

    Autograd would sum two (V, C) gradients for the one weight: the embedding's, a fresh zero-filled
    tensor (154 MB in fp32 for GPT-2 Small) made at the very end of the backward, when every other
    gradient exists. Here the loss's backward, which runs first, leaves the head's gradient in
    `hand_off` (see `linear_cross_entropy`), and this backward adds each looked-up row's gradient into it.
    """

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, hand_off: list[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.hand_off, ctx.weight_shape = hand_off, weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        if ctx.hand_off:
            grad = ctx.hand_off.pop()
        else:  # no loss's backward handed the head's gradient over (the function used on its own)
            grad = torch.zeros(ctx.weight_shape, dtype=grad_out.dtype, device=grad_out.device)
        grad.index_add_(0, ids.flatten(), grad_out.reshape(-1, grad.shape[1]).to(grad.dtype))
        return None, grad, None


def _block_scores(q: torch.Tensor, k: torch.Tensor, start: int, end: int, scale: float) -> torch.Tensor:
    """Scaled scores (fp32 q, k) of queries start:end against keys 0:end, -inf where a key lies in the future."""
    scores = (q[:, :, start:end] @ k[:, :, :end].transpose(-2, -1)).mul_(scale)
    # Only the square of keys start:end can lie in the future of these queries.
    future = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu_(1)
    scores[..., start:end].masked_fill_(future, float("-inf"))
    return scores


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, weight.shape, weight, bias, eps)


def _plain_path() -> bool:
    return not torch.is_grad_enabled() or torch.compiler.is_compiling()


class LeanLinear(nn.Module):
    """`linear(pre(x))` for a LayerNorm or activation `pre` (or none), through `RecomputingLinear` in training.

    It holds the Linear's own parameters (the same objects, under the same names); `pre` stays where it
    is registered (the block's ln_1 / ln_2) and is only referred to here.
    """

    def __init__(self, linear: nn.Linear, pre: nn.Module | None) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.pre_module = (pre,)  # a tuple, so that `pre` is not registered a second time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_module[0]
        if _plain_path():
            return F.linear(pre(x) if pre is not None else x, self.weight, self.bias)
        dtype = compute_dtype(x)
        if isinstance(pre, nn.LayerNorm):
            function = functools.partial(_layer_norm, eps=pre.eps)
            return RecomputingLinear.apply(x, self.weight, self.bias, dtype, function, pre.weight, pre.bias)
        return RecomputingLinear.apply(x, self.weight, self.bias, dtype, pre)


class LeanAttention(CausalSelfAttention):
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        causal = mask is None and q.shape[2] == k.shape[2]
        if causal and self.training and self.attn_pdrop > 0 and q.device.type == "cpu" and not _plain_path():
            return CausalDropoutAttention.apply(q, k, v, self.attn_pdrop)
        return super().attention(q, k, v, mask)


class LeanBlock(Block):
    """The block with ln_1 and ln_2 applied inside the Linear after each (attn.c_attn, mlp.c_fc)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.attn(x, mask, kv_cache)
        return x + self.mlp(x)


class LeanEmbedding(nn.Embedding):
    hand_off: list[torch.Tensor] | None = None  # set by LeanGPT2.forward for the span of one forward

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.hand_off is None:
            return super().forward(ids)
        return TiedEmbedding.apply(ids, self.weight, self.hand_off)


class LeanGPT2(GPT2):
    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *, reduction: str = "mean",
                **inputs: torch.Tensor | None) -> torch.Tensor:
        # The hand-off joins the embedding's backward and the loss's of this forward only: on CPU (where
        # index_add_ is deterministic), when a loss is computed with gradients, by the eager modules.
        if targets is None or input_ids.device.type != "cpu" or _plain_path():
            return super().forward(input_ids, targets, reduction=reduction, **inputs)
        self.transformer.wte.hand_off = []
        try:
            return super().forward(input_ids, targets, reduction=reduction, **inputs)
        finally:
            self.transformer.wte.hand_off = None

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        hand_off = self.transformer.wte.hand_off
        loss_sum, count = linear_cross_entropy(hidden, self.lm_head.weight, targets, weight_gradient_to=hand_off)
        if reduction not in ("sum", "mean"):  # the chunked loss never holds per-token losses
            raise ValueError(f"the memory-saving loss takes reduction 'sum' or 'mean', not {reduction!r}")
        return loss_sum if reduction == "sum" else loss_sum / count  # no target at all: NaN, as F.cross_entropy


def use_memory_saving_kernels(model: GPT2) -> GPT2:
    """Switch `model` (in place) to the kernels above; parameters and state dict are unchanged."""
    if isinstance(model, LeanGPT2):  # once only: a second pass would take the Identity left for mlp.act as `pre`
        return model
    for block in model.transformer.h:
        attention, mlp = block.attn, block.mlp
        attention.c_attn = LeanLinear(attention.c_attn, block.ln_1)
        attention.c_proj = LeanLinear(attention.c_proj, None)
        mlp.c_fc = LeanLinear(mlp.c_fc, block.ln_2)
        mlp.c_proj = LeanLinear(mlp.c_proj, mlp.act)
        mlp.act = nn.Identity()
        # Subclasses that only override how forward computes, so the modules keep their state.
        attention.__class__ = LeanAttention
        block.__class__ = LeanBlock
    model.transformer.wte.__class__ = LeanEmbedding
    model.__class__ = LeanGPT2
    return model
