"""gpt2kids.loss: the chunked LM-head cross-entropy against F.cross_entropy on the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gpt2kids.loss as loss_module
from gpt2kids.loss import linear_cross_entropy, perplexity
from gpt2kids.model import IGNORE_INDEX

BF16_UNIT = 2.0 ** -9  # the largest relative change of rounding one value to bf16


def _reference(hidden, weight, targets, dtype):
    """The plain computation: full logits (in the autocast dtype), then cross-entropy in fp32."""
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk_tokens", [7, 16, 1000], ids=["7-per-chunk", "16-per-chunk", "one-chunk"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_chunked_loss_and_gradients_equal_the_full_logits(chunk_tokens, dtype):
    torch.manual_seed(0)
    rows, width, vocab = 50, 24, 301
    hidden = torch.randn(rows, width)
    weight = torch.randn(vocab, width) * 0.3
    targets = torch.randint(0, vocab, (rows,))
    targets[[3, 17, 40]] = IGNORE_INDEX
    results = []
    for chunked in (True, False):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if chunked:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss, count = linear_cross_entropy(h, w, targets, chunk_tokens=chunk_tokens)
            assert int(count) == rows - 3
        else:
            loss = _reference(h, w, targets, dtype)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    (loss, grad_h, grad_w), (expected_loss, expected_h, expected_w) = results
    if dtype is None:
        # fp32 both: the same products summed in another order, a few hundred terms deep.
        bounds = dict(rtol=1e-5, atol=1e-5)
    else:
        # The same bf16 logits on both sides; the gradients are rounded to bf16 once before each
        # matmul, and the weight's is accumulated over chunks: a few bf16 roundings.
        bounds = dict(rtol=4 * BF16_UNIT, atol=4 * BF16_UNIT)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5 if dtype is None else BF16_UNIT, atol=1e-5)
    torch.testing.assert_close(grad_h, expected_h, **bounds)
    torch.testing.assert_close(grad_w, expected_w, **bounds)


class _MatmulCount(TorchDispatchMode):
    """Counts the matmuls run (the gradients' are mm and addmm too)."""

    def __init__(self) -> None:
        super().__init__()
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.matmuls += func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm_.default)
        return func(*args, **(kwargs or {}))


def test_chunked_loss_without_gradients_computes_only_the_loss():
    # Parameters require grad, as a model's do under evaluation's no_grad: needs_input_grad would still
    # say True, so only the detach keeps the gradient matmuls from running.
    hidden, weight = torch.randn(10, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    targets = torch.randint(0, 20, (10,))
    with torch.no_grad(), _MatmulCount() as counted:
        loss, count = linear_cross_entropy(hidden, weight, targets, chunk_tokens=3)
    assert counted.matmuls == 4  # the logits of the four chunks (3, 3, 3 and 1 tokens), nothing more
    with torch.no_grad():
        torch.testing.assert_close(loss, _reference(hidden, weight, targets, None))
    assert int(count) == 10 and loss.grad_fn is None


@pytest.mark.parametrize("hand_off", [False, True], ids=["returned", "handed-off"])
def test_the_backward_hands_on_the_gradients_it_computed_without_copying_them(hand_off):
    # A scaled copy of the head's gradient would be one more (vocabulary x width) fp32 tensor at the
    # start of the backward, when every activation is alive (GPT-2 Small: 154 MB at the peak). Handed
    # off, the weight's gradient goes to the list (for the tied embedding's backward), not to autograd.
    torch.manual_seed(0)
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (6,))
    handed: list[torch.Tensor] | None = [] if hand_off else None
    loss_sum, _ = linear_cross_entropy(hidden, weight, targets, weight_gradient_to=handed)
    grad_h, grad_w = loss_sum.grad_fn.gradients  # what the forward computed, unscaled
    expected_h, expected_w = grad_h * 0.5, grad_w * 0.5
    addresses = grad_h.data_ptr(), grad_w.data_ptr()
    del grad_h, grad_w
    (0.5 * loss_sum).backward()
    if hand_off:
        assert weight.grad is None
        [weight_grad] = handed
    else:
        weight_grad = weight.grad
    assert (hidden.grad.data_ptr(), weight_grad.data_ptr()) == addresses  # the same memory: no copy
    torch.testing.assert_close(hidden.grad, expected_h, rtol=0, atol=0)
    torch.testing.assert_close(weight_grad, expected_w, rtol=0, atol=0)


def test_perplexity_is_exp_of_the_loss_and_does_not_overflow():
    assert perplexity(3.777) == pytest.approx(43.68, abs=0.01)  # the published card's pair
    assert perplexity(1e6) > 1e34


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_the_softmax_by_blocks_of_rows_equals_one_block(monkeypatch, dtype):
    # Blocks of 3 rows (not dividing the 7-row chunks): the same elementwise arithmetic, but an element
    # may meet a kernel's scalar tail in one layout and its vector body in the other (an ulp apart), and
    # in bf16 a gradient may then round the other way: bounds of a few roundings, as above.
    torch.manual_seed(0)
    hidden, weight = torch.randn(20, 8), torch.randn(30, 8)
    targets = torch.randint(0, 30, (20,))
    targets[[2, 9]] = IGNORE_INDEX
    results = []
    for softmax_elements in (1 << 21, 3 * 30):
        monkeypatch.setattr(loss_module, "SOFTMAX_ELEMENTS", softmax_elements)
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss, _ = linear_cross_entropy(h, w, targets, chunk_tokens=7)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    (loss, grad_h, grad_w), (expected_loss, expected_h, expected_w) = results
    bounds = dict(rtol=1e-5, atol=1e-6) if dtype is None else dict(rtol=4 * BF16_UNIT, atol=4 * BF16_UNIT)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_h, expected_h, **bounds)
    torch.testing.assert_close(grad_w, expected_w, **bounds)



def test_torch_compile_runs_the_chunked_loss_as_written():
    """Traced, its chunk loops would unroll into the graph, for a far longer compile."""
    torch.manual_seed(0)
    hidden = torch.randn(12, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (12,))

    def loss(hidden, weight, targets):
        loss_sum, count = linear_cross_entropy(hidden, weight, targets, chunk_tokens=4)
        return loss_sum / count

    explanation = torch._dynamo.explain(loss)(hidden, weight, targets)
    assert explanation.op_count <= 1  # the division; nothing of the loss itself
    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="eager")(hidden, weight, targets)
    torch.testing.assert_close(compiled, loss(hidden, weight, targets), rtol=0, atol=0)
