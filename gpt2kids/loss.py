"""Cross-entropy of the language-model head without materialising the full logits, and perplexity.

For GPT-2's 50k vocabulary the logits dominate training memory, and a plain
`F.cross_entropy(lm_head(h))` keeps the logits, their fp32 copy and the softmax for the backward.
Here the head and the loss run over chunks of tokens; the gradients with respect to the hidden
states and the head weight are computed in the same pass, chunk by chunk, so only one chunk of
logits ever exists (and in fp32 only a block of its rows). The backward only scales the stored
gradients.
"""

from __future__ import annotations

import math

import torch

from gpt2kids.model import IGNORE_INDEX

# Elements of fp32 logits per chunk (2**25 is 128 MB): big enough for efficient matmuls.
CHUNK_ELEMENTS = 1 << 25
# On CPU, where memory is tight and every temporary is page-faulted in: rows of the head's weight gradient
# accumulated at a time (see the end of the chunk loop), and logits per block of rows that the softmax and
# its gradient run on in fp32 (2**21 is 8 MB: the fp32 copy of the products, logsumexp's temporaries).
# On a GPU every block is a few kernel launches (a 41-row block would make thousands a step): whole chunks.
ACCUMULATE_ROWS = 4096
SOFTMAX_ELEMENTS = 1 << 21


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in here: the autocast dtype when autocast is on for this device."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                weight_gradient_to: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = compute_dtype(hidden)
        h = hidden.to(dtype)
        w = weight.to(dtype)
        want_grad_h, want_grad_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if want_grad_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad_w else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, 0)
        rows, vocab = h.shape[0], w.shape[0]
        wants_gradients = want_grad_h or want_grad_w
        # Equal chunks: 2048 tokens at <= 667 per chunk are 4 x 512, not 3 x 667 + a thin 47-row matmul.
        chunk_tokens = max(1, math.ceil(rows / max(1, math.ceil(rows / chunk_tokens))))
        # One set of buffers, reused by every chunk: fresh chunk-sized tensors would each be page-faulted
        # in anew (glibc returns blocks this big to the OS when they are freed).
        scores = torch.empty(min(chunk_tokens, rows), vocab, dtype=dtype, device=h.device)  # matmul outputs
        fp32_compute = dtype == torch.float32
        on_cpu = h.device.type == "cpu"
        softmax_rows = max(1, SOFTMAX_ELEMENTS // vocab) if on_cpu else len(scores)
        accumulate_rows = ACCUMULATE_ROWS if on_cpu else vocab
        if not fp32_compute:
            logits_block = torch.empty(min(softmax_rows, len(scores)), vocab, dtype=torch.float32, device=h.device)
        if want_grad_w and not fp32_compute:  # for grad_w's accumulation by blocks of rows, below
            block = torch.empty(min(accumulate_rows, vocab), w.shape[1], dtype=dtype, device=h.device)
            block_fp32 = torch.empty(block.shape, dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):  # every operand is in `dtype` already
            for start in range(0, rows, chunk_tokens):
                end = min(start + chunk_tokens, rows)
                h_chunk = h[start:end]
                products = torch.mm(h_chunk, w.t(), out=scores[: end - start])
                # The loss and d loss / d logits (softmax - one_hot, zero on ignored rows) in fp32, a block
                # of rows at a time, written back over the products: the chunk's fp32 logits never exist.
                for first in range(start, end, softmax_rows):
                    last = min(first + softmax_rows, end)
                    t_block, v_block = safe_targets[first:last], valid[first:last]
                    product_block = products[first - start:last - start]
                    logits = product_block if fp32_compute else logits_block[: last - first].copy_(product_block)
                    log_normaliser = torch.logsumexp(logits, dim=-1)
                    target_logit = logits.gather(1, t_block[:, None]).squeeze(1)
                    loss_sum += ((log_normaliser - target_logit) * v_block).sum()
                    if not wants_gradients:
                        continue
                    grad_logits = logits.sub_(log_normaliser[:, None]).exp_()
                    grad_logits[torch.arange(last - first, device=h.device), t_block] -= 1.0
                    grad_logits *= v_block[:, None]
                    if not fp32_compute:
                        product_block.copy_(grad_logits)  # to the compute dtype, in the matmul buffer
                if not wants_gradients:
                    continue
                grad_logits = products  # d loss / d logits, in the compute dtype
                if grad_h is not None:
                    grad_h[start:end] = grad_logits @ w
                if grad_w is not None and fp32_compute:
                    grad_w.addmm_(grad_logits.t(), h_chunk)
                elif grad_w is not None:
                    # grad_w += grad_logits.T @ h_chunk, a block of rows at a time through two small buffers:
                    # whole, the product (compute dtype) and the fp32 copy `+=` makes of it would be two more
                    # (V, C) temporaries.
                    for first in range(0, vocab, accumulate_rows):
                        last = min(first + accumulate_rows, vocab)
                        product = torch.mm(grad_logits[:, first:last].t(), h_chunk, out=block[: last - first])
                        grad_w[first:last] += block_fp32[: last - first].copy_(product)
        # Held as attributes, not saved tensors, so that backward can hand them on as its own results.
        ctx.gradients = (grad_h, grad_w)
        ctx.weight_gradient_to = weight_gradient_to
        count = valid.sum()
        ctx.mark_non_differentiable(count)
        return loss_sum, count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_count: torch.Tensor):  # type: ignore[override]
        # Scaled in place: a scaled copy would be one more head-sized (V, C) fp32 tensor, at the start of
        # the backward, when every activation is still alive. So it can run only once (no retain_graph).
        grad_h, grad_w = ctx.gradients
        del ctx.gradients
        if grad_h is not None:
            grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_loss)
            if ctx.weight_gradient_to is not None:  # the tied embedding's backward adds to it and hands it on
                ctx.weight_gradient_to.append(grad_w)
                grad_w = None
        return grad_h, grad_w, None, None, None


# Run as written under torch.compile: traced, its chunk loops unroll into a graph of hundreds of nodes (a far
# longer compile, see bench/README.md) for nothing gained, as its products are plain matmuls already.
@torch.compiler.disable
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: int | None = None, weight_gradient_to: list[torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy of `hidden @ weight.T` against `targets`, and the token count.

    `hidden` is (..., C), `weight` (V, C), `targets` (...) with IGNORE_INDEX for no loss.
    Returns (loss_sum, count): fp32 scalars; divide for the mean. With `weight_gradient_to`, the
    backward appends the weight's gradient to that list instead of returning it (see
    `gpt2kids.memory_saving.TiedEmbedding`).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if not torch.is_grad_enabled():
        # needs_input_grad ignores no_grad mode; detaching keeps evaluation from computing gradients.
        hidden, weight = hidden.detach(), weight.detach()
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, weight_gradient_to)


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged loss gives a huge number rather than an overflow."""
    return math.exp(min(loss, 80.0))
