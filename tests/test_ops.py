"""gpt2kids.ops: the memory-saving training kernels compute what the plain PyTorch calls compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt2kids.ops import ATTENTION_BLOCK, causal_attention, project


def _plain_and_fused(pre_kind: str, dtype: torch.dtype | None):
    torch.manual_seed(0)
    width, out = 48, 80
    linear = nn.Linear(width, out)
    pre = {"layernorm": nn.LayerNorm(width), "gelu": nn.GELU(approximate="tanh"), "none": None}[pre_kind]
    if isinstance(pre, nn.LayerNorm):  # not the identity init, so its gradients mean something
        nn.init.normal_(pre.weight, 1.0, 0.2)
        nn.init.normal_(pre.bias, 0.0, 0.2)
    x = torch.randn(3, 7, width)
    grad_out = torch.randn(3, 7, out)
    results = []
    for fused in (False, True):
        modules = [linear] + ([pre] if pre is not None else [])
        for module in modules:
            module.zero_grad()
        inputs = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            if fused:
                y = project(linear, inputs, pre)
            else:
                y = linear(pre(inputs) if pre is not None else inputs)
        y.backward(grad_out.to(y.dtype))
        grads = [inputs.grad] + [p.grad.clone() for m in modules for p in m.parameters()]
        results.append((y.detach(), grads))
    return results


@pytest.mark.parametrize("pre_kind", ["layernorm", "gelu", "none"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_project_equals_plain_modules_forward_and_backward(pre_kind, dtype):
    (plain_y, plain_grads), (fused_y, fused_grads) = _plain_and_fused(pre_kind, dtype)
    assert fused_y.dtype == plain_y.dtype
    # The same casts and kernels in the same order: equal to the last bit.
    torch.testing.assert_close(fused_y, plain_y, rtol=0, atol=0)
    assert len(fused_grads) == len(plain_grads)
    for fused, plain in zip(fused_grads, plain_grads, strict=True):
        assert fused.dtype == plain.dtype
        torch.testing.assert_close(fused, plain, rtol=0, atol=0)


def test_project_without_gradients_is_the_plain_call():
    linear, norm = nn.Linear(16, 8), nn.LayerNorm(16)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        y = project(linear, x, norm)
    assert y.grad_fn is None
    torch.testing.assert_close(y, linear(norm(x)).detach(), rtol=0, atol=0)


def _reference_attention(q, k, v, p, generator_state):
    """Plain masked softmax attention with the dropout mask drawn as CausalDropoutAttention draws it."""
    batch, heads, length, head_dim = q.shape
    torch.set_rng_state(generator_state)
    drop = torch.zeros(batch, heads, length, length, dtype=torch.bool)
    for start in range(0, length, ATTENTION_BLOCK):
        end = min(start + ATTENTION_BLOCK, length)
        drop[:, :, start:end, :end] = torch.rand(batch, heads, end - start, end) < p
    scores = (q @ k.transpose(-2, -1)) * head_dim ** -0.5
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    kept = probs.masked_fill(drop, 0.0) / (1 - p)
    return kept @ v, drop


@pytest.mark.parametrize("length", [1, 50, ATTENTION_BLOCK, 2 * ATTENTION_BLOCK + 7])
def test_causal_dropout_attention_matches_masked_softmax_with_the_same_mask(length):
    torch.manual_seed(1)
    p = 0.3
    q, k, v = (torch.randn(2, 3, length, 8, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 3, length, 8)
    state = torch.get_rng_state()
    out = causal_attention(q, k, v, p)
    out.backward(grad_out)
    ours = [out.detach(), q.grad, k.grad, v.grad]
    for t in (q, k, v):
        t.grad = None
    reference, drop = _reference_attention(q, k, v, p, state)
    reference.backward(grad_out)
    theirs = [reference.detach(), q.grad, k.grad, v.grad]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The mask is real dropout: about p of the causal entries are dropped.
    causal = ~torch.ones(length, length, dtype=torch.bool).triu(1)
    if length > 50:
        assert abs(drop[..., causal].float().mean().item() - p) < 0.05


def test_causal_attention_without_dropout_is_sdpa():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 70, 8) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v, 0.0), expected, rtol=0, atol=0)


def test_causal_dropout_attention_in_bf16_is_as_accurate_as_sdpa():
    """With bf16 inputs, about as close to the exact (fp32) result as SDPA's own bf16 kernel."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 4, 200, 64, dtype=torch.bfloat16) * 1.5 for _ in range(3))
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.enable_grad():  # a dropout rate so small that nothing is dropped: the blockwise path, no mask
        ours = causal_attention(q.requires_grad_(), k, v, 1e-12)
    assert ours.dtype == torch.bfloat16
    sdpa_error = (sdpa.float() - exact).abs().mean()
    ours_error = (ours.detach().float() - exact).abs().mean()
    assert ours_error < 1.5 * sdpa_error, (ours_error, sdpa_error)
