"""gpt2kids.decoding: the decode-time weight layouts compute what the plain Linears compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpt2kids.config import GPT2Config
from gpt2kids.decode_loop import generate
from gpt2kids.decoding_kernels import HalvesLinear, OneRowLinear, optimize_for_decoding, without_onednn
from gpt2kids.hf import load_model
from gpt2kids.logits_processors import SamplingSettings
from gpt2kids.model import GPT2

VOCAB = 101  # odd, like GPT-2's 50257: the LM head has a column left over after the halves
EOS = VOCAB - 1  # conftest's hf_model puts end-of-text last
TINY = dict(vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=2, n_head=4)


@pytest.mark.parametrize("out_features", [64, 65, 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5)], ids=["one-token", "batch"])
def test_halves_linear_equals_linear(out_features, bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(24, out_features, bias=bias)
    x = torch.randn(*shape, 24)
    halved = HalvesLinear.from_linear(linear)
    with torch.no_grad():
        torch.testing.assert_close(halved(x), linear(x))
    assert halved(x).shape == (*shape, out_features)


def test_halves_over_columns_are_views_of_the_shared_weight():
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, 16)
    columns = weight.t().contiguous()
    head = HalvesLinear.over_columns(columns)
    assert head.halves.untyped_storage().data_ptr() == columns.untyped_storage().data_ptr()
    assert head.rest.untyped_storage().data_ptr() == columns.untyped_storage().data_ptr()
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(head(x), x @ weight.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimize_for_decoding_keeps_the_tokens(hf_checkpoint, dtype):
    _, folder = hf_checkpoint(**TINY)
    model, _ = load_model(folder, dtype=dtype)
    settings = SamplingSettings(max_new_tokens=20, greedy=True)
    prompts = [[3, 4, 5], [7]]  # of different lengths: the padded, masked batch path too
    before = generate(model.eval(), prompts, settings, EOS)
    optimize_for_decoding(model)
    linears = [m for block in model.transformer.h for m in (block.attn.c_attn, block.attn.c_proj,
                                                             block.mlp.c_fc, block.mlp.c_proj)]
    if dtype == torch.float32:
        assert all(isinstance(m, HalvesLinear) for m in [*linears, model.lm_head])
        # The embedding and the head still share one copy of the tied weight.
        embedding = model.transformer.wte.weight
        assert model.lm_head.halves.untyped_storage().data_ptr() == embedding.untyped_storage().data_ptr()
    else:
        assert all(isinstance(m, OneRowLinear) and m.weight.is_contiguous() for m in [*linears, model.lm_head])
        assert model.lm_head.weight is model.transformer.wte.weight
    assert generate(model, prompts, settings, EOS) == before


def test_optimized_logits_equal_the_plain_model():
    torch.manual_seed(1)
    plain = GPT2(GPT2Config(**TINY)).eval()
    optimized = GPT2(GPT2Config(**TINY)).eval()
    optimized.load_state_dict(plain.state_dict())
    optimize_for_decoding(optimized)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(optimized(ids), plain(ids))


@pytest.mark.parametrize("rows", [1, 5])
def test_one_row_linear_shares_the_parameters_and_computes_the_linear(rows):
    torch.manual_seed(2)
    linear = nn.Linear(64, 96).to(torch.bfloat16)
    one_row = OneRowLinear.from_linear(linear)
    assert one_row.weight is linear.weight and one_row.bias is linear.bias
    x = torch.randn(1, rows, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = (x.float() @ linear.weight.float().t() + linear.bias.float())
        torch.testing.assert_close(one_row(x).float(), expected, rtol=0.02, atol=0.02)
    assert torch.backends.mkldnn.enabled  # switched back on afterwards


def test_without_onednn_restores_the_switch_after_an_error():
    assert torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError), without_onednn():
        assert not torch.backends.mkldnn.enabled
        raise RuntimeError("boom")
    assert torch.backends.mkldnn.enabled
