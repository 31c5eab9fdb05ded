"""The hand-written GPT-2 against transformers' GPT2LMHeadModel on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import hf_model

from gpt2kids.config import GPT2Config
from gpt2kids.hf import load_model
from gpt2kids.model import GPT2, IGNORE_INDEX, KVCache, build_mask

CONFIGS = {
    "tiny": dict(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4),
    "odd": dict(vocab_size=257, n_positions=37, n_embd=60, n_layer=3, n_head=5, n_inner=100),
    "one-layer-one-head": dict(vocab_size=31, n_positions=16, n_embd=24, n_layer=1, n_head=1),
    "exact-gelu": dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2, activation_function="gelu"),
}


def shifted_targets(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], IGNORE_INDEX)], dim=1)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_loss_match_transformers(hf_checkpoint, name):
    reference, folder = hf_checkpoint(**CONFIGS[name])
    ours, _ = load_model(folder)
    ours.eval()
    config = CONFIGS[name]
    input_ids = torch.randint(0, config["vocab_size"], (3, config["n_positions"]))
    with torch.no_grad():
        expected = reference(input_ids, labels=input_ids)
        torch.testing.assert_close(ours(input_ids), expected.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(input_ids, shifted_targets(input_ids)), expected.loss,
                                   rtol=1e-5, atol=1e-5)


def test_parity_would_catch_a_swapped_layernorm_or_a_dropped_bias(hf_checkpoint):
    """The reference's biases and LayerNorms are random (conftest.randomise), so these mistakes show."""
    reference, folder = hf_checkpoint(**CONFIGS["tiny"])
    input_ids = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        expected = reference(input_ids).logits
        swapped, _ = load_model(folder)
        block = swapped.transformer.h[0]
        block.ln_1, block.ln_2 = block.ln_2, block.ln_1
        assert not torch.allclose(swapped.eval()(input_ids), expected, rtol=1e-3, atol=1e-3)
        no_bias, _ = load_model(folder)
        no_bias.transformer.h[1].mlp.c_proj.bias.zero_()
        assert not torch.allclose(no_bias.eval()(input_ids), expected, rtol=1e-3, atol=1e-3)


def test_gpt2_small_shape_matches_transformers(hf_checkpoint):
    reference, folder = hf_checkpoint("small", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12,
                                      n_head=12)
    ours, _ = load_model(folder)
    ours.eval()
    assert ours.num_parameters() == 124_439_808  # GPT-2 Small
    input_ids = torch.randint(0, 50257, (2, 48))
    with torch.no_grad():
        expected = reference(input_ids, labels=input_ids)
        torch.testing.assert_close(ours(input_ids), expected.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(input_ids, shifted_targets(input_ids)), expected.loss)


def small_model(**overrides) -> GPT2:
    config = GPT2Config(**{**CONFIGS["tiny"], "bos_token_id": 100, "eos_token_id": 100, **overrides})
    return GPT2(config).eval()


def test_kv_cache_prefill_then_token_by_token_equals_full_forward():
    model = small_model()
    input_ids = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        full = model(input_ids)
        cache = KVCache(model.config, batch_size=2, max_length=30, device="cpu", dtype=torch.float32)
        pieces = [model(input_ids[:, :11], kv_cache=cache)]
        for position in range(11, 30):
            pieces.append(model(input_ids[:, position:position + 1], kv_cache=cache))
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_several_tokens_after_a_filled_kv_cache_without_a_mask_are_refused():
    """Without a mask SDPA's is_causal aligns queries top-left: the new tokens would not see the prefix."""
    model = small_model()
    input_ids = torch.randint(0, 101, (1, 12))
    cache = KVCache(model.config, batch_size=1, max_length=12, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model(input_ids[:, :8], kv_cache=cache)
        with pytest.raises(ValueError, match="need a mask"):
            model(input_ids[:, 8:], kv_cache=cache)


def test_build_mask_for_the_last_queries_sees_own_and_earlier_unpadded_keys():
    """Queries are the last `query_length` of S positions; padding keys are hidden except a padding
    query's own (no fully masked row)."""
    padding = torch.tensor([[0, 0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    total, query_length = 7, 3
    mask = build_mask(padding, query_length)
    assert mask.shape == (3, 1, query_length, total) and mask.dtype == torch.bool
    for row in range(3):
        for query in range(query_length):
            position = total - query_length + query
            for key in range(total):
                expected = key == position or (key <= position and bool(padding[row, key]))
                assert mask[row, 0, query, key].item() == expected, (row, query, key)


def test_several_tokens_after_a_prefill_with_build_mask_equal_the_full_forward():
    model = small_model()
    input_ids = torch.randint(0, 101, (2, 20))
    padding = torch.ones(2, 20, dtype=torch.long)
    with torch.no_grad():
        full = model(input_ids)
        cache = KVCache(model.config, batch_size=2, max_length=20, device="cpu", dtype=torch.float32)
        first = model(input_ids[:, :12], kv_cache=cache)
        rest = model(input_ids[:, 12:], mask=build_mask(padding, 8), kv_cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_with_mask_and_positions_equals_unpadded():
    model = small_model()
    short = torch.randint(0, 100, (1, 7))
    padded = torch.cat([torch.full((1, 5), 100), short], dim=1)
    padding = torch.cat([torch.zeros(1, 5), torch.ones(1, 7)], dim=1).long()
    positions = (padding.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(short)
        batched = model(padded, mask=build_mask(padding, 12), position_ids=positions)
    torch.testing.assert_close(batched[:, 5:], alone, rtol=1e-5, atol=1e-5)


def test_chunked_loss_gradients_match_plain_cross_entropy():
    model = small_model()
    input_ids = torch.randint(0, 101, (2, 20))
    targets = shifted_targets(input_ids)
    targets[0, 3] = IGNORE_INDEX
    model(input_ids, targets).backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(ours[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_summed_loss_divided_by_tokens_is_the_mean():
    model = small_model()
    input_ids = torch.randint(0, 101, (2, 20))
    targets = shifted_targets(input_ids)
    with torch.no_grad():
        total = model(input_ids, targets, reduction="sum")
        mean = model(input_ids, targets)
    torch.testing.assert_close(total / (targets != IGNORE_INDEX).sum(), mean)


def test_gpt2_initialisation_scales_residual_projections():
    model = GPT2(GPT2Config(vocab_size=512, n_positions=64, n_embd=256, n_layer=8, n_head=4))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * 8)
    assert model.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.transformer.h[3].mlp.c_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert torch.count_nonzero(model.transformer.h[0].attn.c_attn.bias) == 0


def test_no_dropout_modules_when_rates_are_zero():
    without = small_model(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    assert not any(isinstance(m, torch.nn.Dropout) for m in without.modules())
    with_dropout = small_model()
    assert any(isinstance(m, torch.nn.Dropout) for m in with_dropout.modules())


def test_each_dropout_rate_is_where_transformers_puts_it():
    """Three distinct rates, so a dropout built from the wrong one shows (the MLP's is resid_pdrop)."""
    rates = dict(embd_pdrop=0.11, attn_pdrop=0.22, resid_pdrop=0.33)
    reference = hf_model(**CONFIGS["tiny"], **rates)
    ours = small_model(**rates)
    theirs = dict(reference.named_modules())
    dropouts = {name: m.p for name, m in ours.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert set(dropouts) == {"transformer.drop", "transformer.h.0.attn.resid_dropout", "transformer.h.0.mlp.dropout",
                             "transformer.h.1.attn.resid_dropout", "transformer.h.1.mlp.dropout"}
    for name, rate in dropouts.items():
        assert rate == theirs[name].p, name
    for index, block in enumerate(ours.transformer.h):  # attention dropout is SDPA's dropout_p
        assert block.attn.attn_pdrop == theirs[f"transformer.h.{index}.attn.attn_dropout"].p


def test_sequence_longer_than_context_is_refused():
    model = small_model()
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 65, dtype=torch.long))

