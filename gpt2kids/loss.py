"""Cross-entropy of the language-model head without materialising the full logits.

For GPT-2's 50k vocabulary the logits dominate training memory: 8 x 512 tokens x 50257 in fp32 is
800 MB, and a plain `F.cross_entropy(lm_head(h))` keeps the logits, their fp32 copy and the
softmax for the backward. Here the head and the loss run over chunks of tokens; the gradients with
respect to the hidden states and the head weight are computed in the same pass, chunk by chunk,
so only one chunk of logits ever exists. The backward only scales the stored gradients.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Elements of fp32 logits per chunk (2**25 is 128 MB): big enough for efficient matmuls.
CHUNK_ELEMENTS = 1 << 25


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in here: the autocast dtype when autocast is on for this device."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = compute_dtype(hidden)
        h = hidden.to(dtype)
        w = weight.to(dtype)
        want_grad_h, want_grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_grad_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad_w else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, 0)
        for start in range(0, h.shape[0], chunk_tokens):
            end = start + chunk_tokens
            h_chunk, t_chunk, v_chunk = h[start:end], safe_targets[start:end], valid[start:end]
            logits = (h_chunk @ w.t()).float()
            log_normaliser = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, t_chunk[:, None]).squeeze(1)
            loss_sum += ((log_normaliser - target_logit) * v_chunk).sum()
            if grad_h is None and grad_w is None:
                continue
            # d loss / d logits = softmax - one_hot, zero on ignored rows; computed in place.
            grad_logits = logits.sub_(log_normaliser[:, None]).exp_()
            rows = torch.arange(grad_logits.shape[0], device=grad_logits.device)
            grad_logits[rows, t_chunk] -= 1.0
            grad_logits *= v_chunk[:, None]
            grad_logits = grad_logits.to(dtype)
            if grad_h is not None:
                grad_h[start:end] = grad_logits @ w
            if grad_w is not None:
                grad_w += grad_logits.t() @ h_chunk
        ctx.save_for_backward(grad_h, grad_w)
        count = valid.sum()
        ctx.mark_non_differentiable(count)
        return loss_sum, count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_count: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        grad_hidden = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        grad_weight = grad_w * grad_loss if grad_w is not None else None
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy of `hidden @ weight.T` against `targets`, and the token count.

    `hidden` is (..., C), `weight` (V, C), `targets` (...) with IGNORE_INDEX for no loss.
    Returns (loss_sum, count): fp32 scalars; divide for the mean.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if not torch.is_grad_enabled():
        # needs_input_grad ignores no_grad mode; detaching keeps evaluation from computing gradients.
        hidden, weight = hidden.detach(), weight.detach()
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)
