"""The decode loop against transformers' generate, and against recomputing the whole sequence."""

from __future__ import annotations

import pytest
import torch

from gpt2kids.config import GPT2Config
from gpt2kids.decode_loop import fit_prompt, generate
from gpt2kids.errors import UserError
from gpt2kids.hf import load_model
from gpt2kids.logits_processors import LogitsProcessors, SamplingSettings, choose, draw
from gpt2kids.model import GPT2, build_mask

VOCAB = 101
EOS = VOCAB - 1  # conftest's hf_model puts end-of-text last
TINY = dict(vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=2, n_head=4)


@torch.inference_mode()
def recomputing_generate(model, prompts, settings, eos_id, generator=None):
    """The reference: no KV cache, the whole (left-padded) sequence recomputed at every step."""
    rows = [list(p) for p in prompts for _ in range(settings.num_return_sequences)]
    width = max(map(len, rows))
    sequence = torch.tensor([[eos_id] * (width - len(r)) + r for r in rows])
    padding = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    processors = LogitsProcessors(settings, rows, model.config.vocab_size, "cpu")
    outputs, finished = [[] for _ in rows], [False] * len(rows)
    for _ in range(settings.max_new_tokens):
        positions = (padding.cumsum(-1) - 1).clamp(min=0)
        logits = model(sequence, mask=build_mask(padding, sequence.shape[1]), position_ids=positions)
        tokens = choose(processors(logits[:, -1].float()), settings.greedy, generator)
        tokens = torch.where(torch.tensor(finished), eos_id, tokens)
        for row, token in enumerate(tokens.tolist()):
            finished[row] = finished[row] or token == eos_id
            if not finished[row]:
                outputs[row].append(token)
        if all(finished):
            break
        processors.add(tokens)
        sequence = torch.cat([sequence, tokens[:, None]], dim=1)
        padding = torch.cat([padding, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
    return outputs


# --- whole decodes ---------------------------------------------------------------------------------

def up_to_eos(ids: list[int]) -> list[int]:
    return ids[:ids.index(EOS)] if EOS in ids else ids


@pytest.fixture
def pair(hf_checkpoint):
    reference, folder = hf_checkpoint(**TINY)
    ours, _ = load_model(folder)
    return reference, ours.eval()


@pytest.mark.parametrize("options", [{}, dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2),
                                     dict(repetition_penalty=1.2, no_repeat_ngram_size=3)])
def test_greedy_matches_transformers(pair, options):
    reference, ours = pair
    prompt = torch.randint(0, EOS, (1, 9))
    with torch.no_grad():
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                      max_new_tokens=30, pad_token_id=EOS, eos_token_id=EOS, **options)
    expected_new = up_to_eos(expected[0, prompt.shape[1]:].tolist())
    got = generate(ours, [prompt[0].tolist()], SamplingSettings(max_new_tokens=30, greedy=True, **options), EOS)
    assert got == [expected_new]
    assert len(expected_new) >= 5  # the comparison covers real decoding, not an early stop


def test_a_padded_batch_with_repetition_penalty_matches_transformers(pair):
    """transformers' repetition penalty skips each row's left padding (prompt_ignore_length), as gpt2kids' does.
    The padding token is the short row's first choice, so a penalty that counted it would change that row."""
    reference, ours = pair
    torch.manual_seed(3)
    short, long = torch.randint(0, EOS, (4,)).tolist(), torch.randint(0, EOS, (9,)).tolist()
    settings = SamplingSettings(max_new_tokens=8, greedy=True, repetition_penalty=3.0)
    [alone] = generate(ours, [short], settings, EOS)
    pad = alone[0]
    input_ids = torch.tensor([[pad] * 5 + short, long])
    attention_mask = torch.tensor([[0] * 5 + [1] * 4, [1] * 9])
    with torch.no_grad():
        expected = reference.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=8,
                                      pad_token_id=pad, eos_token_id=EOS, repetition_penalty=3.0)
    got = generate(ours, [short, long], settings, EOS)
    assert got == [up_to_eos(row) for row in expected[:, 9:].tolist()]
    assert got[0] == alone


def test_several_end_ids_stop_each_row_at_any_of_them_as_in_transformers(pair):
    reference, ours = pair
    prompts = torch.randint(0, EOS, (3, 7))
    settings = SamplingSettings(max_new_tokens=20, greedy=True)
    free = generate(ours, prompts.tolist(), settings, EOS, stop_at_eos=False)
    other_end = free[0][5]  # a token row 0 produces: made a second end id, as a generation_config.json lists
    with torch.no_grad():
        expected = reference.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                      max_new_tokens=20, pad_token_id=EOS, eos_token_id=[EOS, other_end])
    expected_new = [[t for t in row[:next((i for i, t in enumerate(row) if t in (EOS, other_end)), len(row))]]
                    for row in expected[:, prompts.shape[1]:].tolist()]
    assert len(expected_new[0]) <= 5  # row 0 stopped at the second end id
    assert generate(ours, prompts.tolist(), settings, EOS, more_end_ids=[other_end]) == expected_new
    assert generate(ours, prompts.tolist(), settings, EOS) != expected_new  # without it, row 0 goes on


def test_seeded_sampling_matches_transformers(pair, monkeypatch):
    """With the same RNG stream and the same draw, the processors are those of transformers.

    transformers draws with torch.multinomial over the whole vocabulary, gpt2kids among the tokens its
    processors kept (`draw`, the same distribution; tests/test_logits_processors.py): here transformers
    draws as gpt2kids does, so the sampled tokens agree exactly when the probabilities do.
    """
    reference, ours = pair
    prompt = torch.randint(0, EOS, (1, 5))
    options = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1)

    def multinomial_as_gpt2kids_draws(probs, num_samples, generator=None):
        assert num_samples == 1
        return draw(probs, generator)[:, None]

    monkeypatch.setattr(torch, "multinomial", multinomial_as_gpt2kids_draws)
    torch.manual_seed(7)
    with torch.no_grad():
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                      max_new_tokens=25, pad_token_id=EOS, eos_token_id=EOS, **options)
    torch.manual_seed(7)
    got = generate(ours, [prompt[0].tolist()], SamplingSettings(max_new_tokens=25, **options), EOS)
    assert got == [up_to_eos(expected[0, prompt.shape[1]:].tolist())]


def tiny_model(**overrides) -> GPT2:
    torch.manual_seed(3)
    config = GPT2Config(**{**TINY, "bos_token_id": EOS, "eos_token_id": EOS, **overrides})
    return GPT2(config).eval()


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampling"])
def test_a_model_with_non_finite_scores_stops_with_a_clear_error(greedy):
    model = tiny_model()
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")  # one NaN reaches every score
    with pytest.raises(UserError, match="not finite"):
        generate(model, [[5, 6, 7]], SamplingSettings(max_new_tokens=5, greedy=greedy), EOS)


@pytest.mark.parametrize("settings", [dict(temperature=1e-40), dict(repetition_penalty=1e-40, top_k=0)])
def test_settings_so_extreme_that_the_scores_overflow_stop_with_a_clear_error(settings):
    # Scores divided by 1e-40 overflow to infinity, and softmax over infinities is NaN: nothing to draw.
    with pytest.raises(UserError, match="leave no token to draw"):
        generate(tiny_model(), [[5, 6, 7]], SamplingSettings(max_new_tokens=3, **settings), EOS)


def test_batched_prompts_of_different_lengths_equal_each_alone():
    model = tiny_model()
    prompts = [[5, 6, 7], list(range(20, 37)), [9], list(range(40, 48))]
    settings = SamplingSettings(max_new_tokens=20, greedy=True, repetition_penalty=1.2, no_repeat_ngram_size=3)
    batched = generate(model, prompts, settings, EOS)
    alone = [generate(model, [prompt], settings, EOS)[0] for prompt in prompts]
    assert batched == alone


@pytest.mark.parametrize("greedy", [True, False])
def test_kv_cache_equals_recomputing(greedy):
    model = tiny_model()
    prompts = [[5, 6, 7], list(range(20, 31))]
    settings = SamplingSettings(max_new_tokens=25, greedy=greedy, top_k=30, top_p=0.95, num_return_sequences=2)
    cached = generate(model, prompts, settings, EOS, torch.Generator().manual_seed(11))
    recomputed = recomputing_generate(model, prompts, settings, EOS, torch.Generator().manual_seed(11))
    assert cached == recomputed
    assert len(cached) == 4


def test_same_seed_same_tokens_other_seed_other_tokens():
    model = tiny_model()
    settings = SamplingSettings(max_new_tokens=30, top_k=0)

    def run(seed: int) -> list[list[int]]:
        return generate(model, [[1, 2, 3]], settings, EOS, torch.Generator().manual_seed(seed), stop_at_eos=False)

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_sequences_stop_on_their_own_at_eos_and_callback_sees_each_step():
    model = tiny_model()
    prompts = [[1, 2, 3], [7, 8, 9], [30, 31, 32]]  # equal lengths: no padding, so eos only stops
    settings = SamplingSettings(max_new_tokens=15, greedy=True)
    free = generate(model, prompts, settings, EOS, stop_at_eos=False)
    stop = free[0][4]  # call a token that row 0 produces "end-of-text"
    expected = [row[:row.index(stop)] if stop in row else row for row in free]
    steps: list[list[int | None]] = []
    out = generate(model, prompts, settings, stop, on_tokens=steps.append)
    assert out == expected
    assert len(out[0]) <= 4
    for row in range(len(prompts)):
        column = [step[row] for step in steps]
        assert [token for token in column if token is not None] == out[row]
        if None in column:  # once finished, a row reports nothing more
            assert all(token is None for token in column[column.index(None):])
    assert len(steps) == max(len(row) + (row != free_row) for row, free_row in zip(out, free, strict=True))


def test_stops_when_the_context_is_full():
    model = tiny_model(n_positions=16)
    out = generate(model, [list(range(10))], SamplingSettings(max_new_tokens=6, greedy=True), EOS,
                   stop_at_eos=False)
    assert len(out[0]) == 6
    # More new tokens than the context holds: the whole prompt stays (it was cut to one token), and
    # decoding stops when the context is full (the last token sampled is never fed back, hence one more).
    out = generate(model, [list(range(10))], SamplingSettings(max_new_tokens=50, greedy=True), EOS,
                   stop_at_eos=False)
    assert out == generate(model, [list(range(10))], SamplingSettings(max_new_tokens=7, greedy=True), EOS,
                           stop_at_eos=False)


def test_empty_prompt_starts_from_eos():
    model = tiny_model()
    settings = SamplingSettings(max_new_tokens=8, greedy=True)
    assert generate(model, [[]], settings, EOS) == generate(model, [[EOS]], settings, EOS)


def test_fit_prompt():
    assert fit_prompt([], 64, 10, EOS) == ([EOS], False)
    assert fit_prompt([1, 2, 3], 64, 10, EOS) == ([1, 2, 3], False)
    # The last new token is never fed back: 55 prompt tokens and 10 new ones take 64 positions.
    assert fit_prompt(list(range(55)), 64, 10, EOS) == (list(range(55)), False)
    assert fit_prompt(list(range(60)), 64, 10, EOS) == (list(range(5, 60)), True)
    assert fit_prompt(list(range(60)), 64, 64, EOS) == ([59], True)  # 64 new tokens fit after one
    # 100 new tokens fit after no prompt: the prompt stays (what fits of it) and the context fills up.
    assert fit_prompt(list(range(60)), 64, 100, EOS) == (list(range(60)), False)
    assert fit_prompt(list(range(70)), 64, 100, EOS) == (list(range(6, 70)), True)



def test_a_prompt_that_just_fits_the_context_decodes_as_in_transformers(pair):
    reference, ours = pair
    context, new_tokens = TINY["n_positions"], 6
    prompt = torch.randint(0, EOS, (1, context - new_tokens + 1))  # fills the context with the last token fed
    with torch.no_grad():
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                      max_new_tokens=new_tokens, pad_token_id=EOS, eos_token_id=EOS)
    got = generate(ours, [prompt[0].tolist()], SamplingSettings(max_new_tokens=new_tokens, greedy=True), EOS)
    assert got == [up_to_eos(expected[0, prompt.shape[1]:].tolist())]
