"""gpt2kids.memory_saving: the memory-saving kernels compute what the plain model computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2kids.config import GPT2Config
from gpt2kids.memory_saving import (
    ATTENTION_BLOCK,
    CausalDropoutAttention,
    LeanLinear,
    TiedEmbedding,
    use_memory_saving_kernels,
)
from gpt2kids.model import GPT2, IGNORE_INDEX

# bf16 keeps 8 significant bits: rounding a value to bf16 moves it by at most 2**-9 of itself.
BF16_UNIT = 2.0 ** -9


def _plain_and_lean(pre_kind: str, dtype: torch.dtype | None):
    torch.manual_seed(0)
    width, out = 48, 80
    linear = nn.Linear(width, out)
    pre = {"layernorm": nn.LayerNorm(width), "gelu": nn.GELU(approximate="tanh"), "none": None}[pre_kind]
    if isinstance(pre, nn.LayerNorm):  # not the identity init, so its gradients mean something
        nn.init.normal_(pre.weight, 1.0, 0.2)
        nn.init.normal_(pre.bias, 0.0, 0.2)
    nn.init.normal_(linear.bias, 0.0, 0.2)
    x = torch.randn(3, 7, width)
    grad_out = torch.randn(3, 7, out)
    results = []
    for lean in (False, True):
        modules = [linear] + ([pre] if pre is not None else [])
        for module in modules:
            module.zero_grad()
        inputs = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            y = LeanLinear(linear, pre)(inputs) if lean else linear(pre(inputs) if pre is not None else inputs)
        y.backward(grad_out.to(y.dtype))
        grads = [inputs.grad] + [p.grad.clone() for m in modules for p in m.parameters()]
        results.append((y.detach(), grads))
    return results


@pytest.mark.parametrize("pre_kind", ["layernorm", "gelu", "none"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_lean_linear_equals_plain_modules_forward_and_backward(pre_kind, dtype):
    (plain_y, plain_grads), (lean_y, lean_grads) = _plain_and_lean(pre_kind, dtype)
    assert lean_y.dtype == plain_y.dtype
    # The same casts and kernels in the same order: equal to the last bit.
    torch.testing.assert_close(lean_y, plain_y, rtol=0, atol=0)
    assert len(lean_grads) == len(plain_grads)
    for lean, plain in zip(lean_grads, plain_grads, strict=True):
        assert lean.dtype == plain.dtype
        torch.testing.assert_close(lean, plain, rtol=0, atol=0)


def test_lean_linear_without_gradients_is_the_plain_call():
    linear, norm = nn.Linear(16, 8), nn.LayerNorm(16)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        y = LeanLinear(linear, norm)(x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, linear(norm(x)).detach(), rtol=0, atol=0)


# --- blockwise attention with dropout ------------------------------------------------------------

def _dropout_mask(shape, p, generator_state):
    """The mask CausalDropoutAttention draws: uniform draws block by block, from the global generator."""
    batch, heads, length, _ = shape
    torch.set_rng_state(generator_state)
    drop = torch.zeros(batch, heads, length, length, dtype=torch.bool)
    for start in range(0, length, ATTENTION_BLOCK):
        end = min(start + ATTENTION_BLOCK, length)
        drop[:, :, start:end, :end] = torch.rand(batch, heads, end - start, end) < p
    return drop


def _reference_attention(q, k, v, p, drop):
    """Plain masked softmax attention with a given dropout mask."""
    length, head_dim = q.shape[2], q.shape[3]
    scores = (q @ k.transpose(-2, -1)) * head_dim ** -0.5
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return probs.masked_fill(drop, 0.0) / (1 - p) @ v


def _gradients(function, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = function(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("length", [1, 50, ATTENTION_BLOCK, 2 * ATTENTION_BLOCK + 7])
def test_causal_dropout_attention_matches_masked_softmax_with_the_same_mask(length):
    torch.manual_seed(1)
    p = 0.3
    q, k, v = (torch.randn(2, 3, length, 8) for _ in range(3))
    grad_out = torch.randn(2, 3, length, 8)
    state = torch.get_rng_state()
    ours = _gradients(lambda *t: CausalDropoutAttention.apply(*t, p), (q, k, v), grad_out)
    drop = _dropout_mask(q.shape, p, state)
    theirs = _gradients(lambda *t: _reference_attention(*t, p, drop), (q, k, v), grad_out)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp32, sums in another order
    # The mask is real dropout: about p of the causal entries are dropped.
    causal = ~torch.ones(length, length, dtype=torch.bool).triu(1)
    if length > 50:
        assert abs(drop[..., causal].float().mean().item() - p) < 0.05


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_causal_dropout_attention_bf16_backward_is_within_bf16_rounding_of_fp32():
    """bf16 inputs: output and gradients against the fp32 computation on the same inputs and mask.

    Each bf16 matmul rounds its two operands and its result once, and the gradient of q (or k)
    goes through two such matmuls: at most ~4 roundings of 2**-9 each along any path, so the
    norm-relative error stays below 4 * 2**-9. A wrong mask or a missing rescale is off by far more.
    """
    torch.manual_seed(4)
    p = 0.1
    q, k, v = (torch.randn(2, 4, 2 * ATTENTION_BLOCK + 5, 16, dtype=torch.bfloat16) for _ in range(3))
    grad_out = torch.randn(q.shape, dtype=torch.bfloat16)
    state = torch.get_rng_state()
    ours = _gradients(lambda *t: CausalDropoutAttention.apply(*t, p), (q, k, v), grad_out)
    assert all(t.dtype == torch.bfloat16 for t in ours)
    drop = _dropout_mask(q.shape, p, state)
    exact = _gradients(lambda *t: _reference_attention(*t, p, drop), (q.float(), k.float(), v.float()),
                       grad_out.float())
    errors = [_relative_error(a, b) for a, b in zip(ours, exact, strict=True)]
    assert max(errors) < 4 * BF16_UNIT, errors
    # The bound can fail: the same computation with another dropout mask is far outside it.
    other = _dropout_mask(q.shape, p, torch.Generator().manual_seed(99).get_state())
    wrong = _gradients(lambda *t: _reference_attention(*t, p, other), (q.float(), k.float(), v.float()),
                       grad_out.float())
    assert min(_relative_error(a, b) for a, b in zip(wrong, exact, strict=True)) > 10 * 4 * BF16_UNIT


def test_causal_dropout_attention_in_bf16_is_as_accurate_as_sdpa():
    """With bf16 inputs and nothing dropped, about as close to the exact (fp32) result as SDPA's own bf16 kernel."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 4, 200, 64, dtype=torch.bfloat16) * 1.5 for _ in range(3))
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ours = CausalDropoutAttention.apply(q, k, v, 1e-12)  # a rate so small that nothing is dropped
    assert ours.dtype == torch.bfloat16
    sdpa_error = (sdpa.float() - exact).abs().mean()
    ours_error = (ours.float() - exact).abs().mean()
    assert ours_error < 1.5 * sdpa_error, (ours_error, sdpa_error)


# --- the tied embedding --------------------------------------------------------------------------

def test_the_tied_embedding_without_a_handed_gradient_has_the_embeddings_gradient():
    torch.manual_seed(0)
    weight = torch.randn(11, 4, requires_grad=True)
    ids = torch.tensor([[1, 3, 3], [0, 10, 1]])  # repeated ids: their rows' gradients add up
    grad_out = torch.randn(2, 3, 4)
    F.embedding(ids, weight).backward(grad_out)
    expected, weight.grad = weight.grad, None
    TiedEmbedding.apply(ids, weight, []).backward(grad_out)
    torch.testing.assert_close(weight.grad, expected, rtol=1e-6, atol=1e-6)  # sums of up to 2 rows, reordered


class _EmbeddingBackwards(TorchDispatchMode):
    """Records the table size (rows) of every embedding backward that builds its own gradient, and index_add_ calls."""

    def __init__(self) -> None:
        super().__init__()
        self.dense_rows: list[int] = []
        self.index_adds = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.embedding_dense_backward.default:
            self.dense_rows.append(args[2])
        self.index_adds += func is torch.ops.aten.index_add_.default
        return func(*args, **(kwargs or {}))


def test_the_lean_model_adds_the_embeddings_gradient_into_the_heads():
    # The plain backward builds the embedding's own (vocabulary x width) gradient with
    # embedding_dense_backward (154 MB for GPT-2 Small), then adds it to the head's.
    ids = torch.randint(0, 97, (2, 16))
    for lean in (False, True):
        model = _random_model().train()
        if lean:
            use_memory_saving_kernels(model)
        loss = model(ids, ids, reduction="sum")
        with _EmbeddingBackwards() as seen:
            loss.backward()
        # The position embedding (32 rows) keeps its own gradient; the token embedding's (97) goes into the head's.
        assert sorted(seen.dense_rows) == ([32] if lean else [32, 97])
        assert seen.index_adds == (1 if lean else 0)


# --- the whole model -----------------------------------------------------------------------------

CONFIG = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, bos_token_id=96, eos_token_id=96)


def _random_model(config: GPT2Config = CONFIG) -> GPT2:
    torch.manual_seed(5)
    model = GPT2(config)
    with torch.no_grad():
        for parameter in model.parameters():  # every parameter random: LayerNorms and biases too
            parameter.normal_(0.0, 0.2)
    return model


def test_the_lean_model_has_the_same_parameters_and_names():
    plain = _random_model()
    lean = use_memory_saving_kernels(_random_model())
    assert isinstance(lean, GPT2)
    assert plain.state_dict().keys() == lean.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, lean.state_dict()[key]), key
    assert lean.lm_head.weight is lean.transformer.wte.weight
    assert sum(1 for _ in lean.parameters()) == sum(1 for _ in plain.parameters())


def test_switching_twice_changes_nothing_more():
    ids = torch.randint(0, 97, (2, 16))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    once = use_memory_saving_kernels(_random_model()).train()
    twice = use_memory_saving_kernels(use_memory_saving_kernels(_random_model())).train()
    assert torch.equal(once(ids, targets), twice(ids, targets))


def test_the_lean_loss_reduces_as_the_plain_one_or_refuses():
    plain, lean = _random_model().train(), use_memory_saving_kernels(_random_model()).train()
    ids = torch.randint(0, 97, (2, 16))
    ignored = torch.full_like(ids, IGNORE_INDEX)
    assert plain(ids, ignored).isnan() and lean(ids, ignored).isnan()  # a mean over no target
    with pytest.raises(ValueError, match="reduction 'sum' or 'mean'"):
        lean(ids, ids, reduction="none")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_the_lean_model_gives_the_loss_and_gradients_of_the_plain_model(dtype):
    plain, lean = _random_model().train(), use_memory_saving_kernels(_random_model()).train()
    ids = torch.randint(0, 97, (3, 32))
    targets = torch.cat([ids[:, 1:], torch.full((3, 1), IGNORE_INDEX)], dim=1)
    losses, grads = [], []
    for model in (plain, lean):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(ids, targets, reduction="sum")
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad for name, p in model.named_parameters()})
    # Only the loss is computed differently (by chunks, its sums in another order): fp32 rounding
    # (~1e-7 relative per operation, a few hundred operations deep) in fp32; in bf16 both sides
    # round the same logits, then sum in another order.
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype is None else dict(rtol=4 * BF16_UNIT, atol=4 * BF16_UNIT)
    torch.testing.assert_close(losses[1], losses[0], **tolerance)
    for name, grad in grads[0].items():
        relative = (grads[1][name] - grad).norm() / grad.norm()
        assert relative < (1e-5 if dtype is None else 4 * BF16_UNIT), (name, float(relative))



def test_the_lean_model_in_eval_mode_drops_nothing_even_with_gradients():
    """eval() turns attention dropout off; gradients on (as when probing a model) must not turn it back on."""
    plain = _random_model(CONFIG.with_dropout(0.1)).eval()
    lean = use_memory_saving_kernels(_random_model(CONFIG.with_dropout(0.1))).eval()
    ids = torch.randint(0, 97, (2, 32))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    expected = plain(ids, targets)
    assert torch.is_grad_enabled()
    first, second = lean(ids, targets), lean(ids, targets)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)
