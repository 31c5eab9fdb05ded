"""The logits processors against their transformers counterparts, score for score."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gpt2kids.errors import UserError
from gpt2kids.logits_processors import (
    NGramBans,
    SamplingSettings,
    apply_bans,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    draw,
    seen_tokens,
)

VOCAB = 101
EOS = VOCAB - 1  # conftest's hf_model puts end-of-text last


@pytest.fixture
def scores() -> torch.Tensor:
    return torch.randn(4, VOCAB) * 3


@pytest.fixture
def history() -> torch.Tensor:
    # A small id range so that tokens and n-grams repeat.
    return torch.randint(0, 12, (4, 40))


# --- processors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature(scores, temperature):
    expected = TemperatureLogitsWarper(temperature)(None, scores.clone())
    torch.testing.assert_close(apply_temperature(scores, temperature), expected, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 5, 50, VOCAB, VOCAB + 10])
def test_top_k(scores, k):
    expected = TopKLogitsWarper(k)(None, scores.clone())
    assert torch.equal(apply_top_k(scores, k), expected)


def test_top_k_keeps_ties_at_the_threshold():
    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    ours = apply_top_k(scores, 2)
    assert torch.equal(ours, TopKLogitsWarper(2)(None, scores.clone()))
    assert torch.isfinite(ours).sum(dim=1).tolist() == [4, 6]


# 1e-8: 1 - top_p rounds to 1.0 in fp32, so every token's cumulated mass is "at most 1 - top_p" and
# only the rule that the best token always stays (min_tokens_to_keep=1 in transformers) keeps one.
@pytest.mark.parametrize("top_p", [1e-8, 1e-6, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_top_p(scores, top_p):
    expected = TopPLogitsWarper(top_p)(None, scores.clone())
    ours = apply_top_p(scores, top_p)
    assert torch.equal(ours, expected)
    if top_p < 1e-5:  # only the best token survives
        assert torch.isfinite(ours).sum(dim=1).tolist() == [1] * scores.shape[0]
        assert torch.equal(ours.argmax(dim=1), scores.argmax(dim=1))


def test_top_p_after_top_k_with_minus_infinity(scores):
    filtered = apply_top_k(scores, 7)
    assert torch.equal(apply_top_p(filtered, 0.8), TopPLogitsWarper(0.8)(None, filtered.clone()))


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty(scores, history, penalty):
    expected = RepetitionPenaltyLogitsProcessor(penalty)(history, scores.clone())
    seen = seen_tokens(history.tolist(), VOCAB, "cpu")
    torch.testing.assert_close(apply_repetition_penalty(scores, seen, penalty), expected, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram(scores, history, n):
    expected = NoRepeatNGramLogitsProcessor(n)(history, scores.clone())
    bans = NGramBans(history.tolist(), n)
    ours = apply_bans(scores, [bans.banned(row) for row in range(history.shape[0])])
    assert torch.equal(ours, expected)


def test_no_repeat_ngram_kept_incrementally_equals_from_scratch(history):
    bans = NGramBans(history[:, :10].tolist(), 3)
    for column in range(10, history.shape[1]):
        for row in range(history.shape[0]):
            bans.add(row, int(history[row, column]))
    fresh = NGramBans(history.tolist(), 3)
    assert [bans.banned(r) for r in range(4)] == [fresh.banned(r) for r in range(4)]


def test_no_repeat_ngram_on_short_history():
    scores = torch.zeros(1, 10)
    bans = NGramBans([[3]], 3)
    assert torch.equal(apply_bans(scores, [bans.banned(0)]), scores)


# --- the draw --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kept", [4, 6], ids=["among-the-kept", "whole-vocabulary"])
def test_draw_samples_each_token_with_its_probability(kept):
    probs = torch.zeros(30)  # 4 of 30 kept: the race runs among them
    probs[[3, 11, 12, 29]] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    if kept == 6:  # every token possible: the race runs over the whole row
        probs = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
    rows, draws = 8, 5000
    generator = torch.Generator().manual_seed(0)
    tokens = torch.cat([draw(probs.expand(rows, -1), generator) for _ in range(draws)])
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    n = rows * draws
    expected, spread = n * probs.double(), (n * probs.double() * (1 - probs.double())).sqrt()
    # Within 5 binomial standard deviations of the expected count (a wrong draw misses by hundreds of them).
    assert ((counts - expected).abs() <= 5 * spread).all(), (counts, expected)
    assert counts[probs == 0].sum() == 0


def test_draw_picks_per_row_among_rows_that_keep_different_counts():
    probs = torch.zeros(2, 20)
    probs[0, 1] = 1.0
    probs[1, [0, 13]] = 0.5
    generator = torch.Generator().manual_seed(1)
    tokens = torch.stack([draw(probs, generator) for _ in range(200)])
    assert (tokens[:, 0] == 1).all()
    assert set(tokens[:, 1].tolist()) == {0, 13}


@pytest.mark.parametrize("change, message", [
    (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(max_new_tokens=-5), "--max-new-tokens"),
    (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.5), "--top-p"),
    (dict(top_p=float("nan")), "--top-p"),
    (dict(temperature=0.0), "--greedy"),
    (dict(top_k=-1), "--top-k"),
    (dict(repetition_penalty=0.0), "--repetition-penalty"),
    (dict(repetition_penalty=float("inf")), "--repetition-penalty must be a finite number"),
    (dict(temperature=float("inf")), "--temperature must be a finite number"),
    (dict(no_repeat_ngram_size=-1), "--no-repeat-ngram-size"),
    (dict(num_return_sequences=0), "--num-return-sequences"),
])
def test_settings_refuse_bad_values(change, message):
    with pytest.raises(UserError, match=message):
        SamplingSettings(**change).validate()
    SamplingSettings(temperature=0.0, greedy=True).validate()  # greedy ignores the temperature
