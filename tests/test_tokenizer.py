from __future__ import annotations

import json

import pytest
from conftest import SAMPLE_TEXTS

from gpt2kids.errors import UserError
from gpt2kids.tokenizer import END_OF_TEXT, Tokenizer

HARD_TEXT = ("Halo, Dunia! Apa kabar? Ini cerita tentang “Kancil” — si cerdik.\n\n"
             "Emoji: 🚀🐊🌈 👨‍👩‍👧, angka 3,14 & tanda-tanda: (a) [b] {c} <d>… 100%\r\nselesai.\t ")


def test_round_trip_of_indonesian_text_with_punctuation_emoji_and_newlines(tokenizer):
    for text in [HARD_TEXT, *SAMPLE_TEXTS[:6], "", " ", "\n\n\n"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_end_of_text_is_one_token(tokenizer):
    ids = tokenizer.encode(f"Tamat.{END_OF_TEXT}Mulai")
    assert tokenizer.eos_id in ids
    assert ids.count(tokenizer.eos_id) == 1
    assert tokenizer.vocab_size <= 400


def test_saved_tokenizer_loads_in_transformers_with_the_same_ids(tokenizer, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer.save(tmp_path, model_max_length=64)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tmp_path)
    for text in [HARD_TEXT, *SAMPLE_TEXTS[:6]]:
        expected = tokenizer.encode(text)
        assert fast(text)["input_ids"] == expected
        assert auto(text)["input_ids"] == expected
    assert auto.eos_token == END_OF_TEXT


def test_vocab_and_merges_give_the_same_ids_as_tokenizer_json(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    reloaded = Tokenizer.from_path(tmp_path)
    assert reloaded.eos_id == tokenizer.eos_id
    for text in [HARD_TEXT, *SAMPLE_TEXTS[:6]]:
        assert reloaded.encode(text) == tokenizer.encode(text)


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "nope.json")
    with pytest.raises(UserError, match="holds no tokenizer.json"):
        Tokenizer.from_path(tmp_path)
    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.from_path(tmp_path / "tokenizer.json")


def test_too_small_vocab_is_refused():
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train(["abc"], vocab_size=100)


def test_declared_special_tokens_and_prefix_space_survive_a_save(tmp_path):
    """A RoBERTa-style BPE (<s> <pad> </s> <unk> <mask>, a prefix space, no <|endoftext|>) saved and read back."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                "mask_token": "<mask>"}
    backend.train_from_iterator(SAMPLE_TEXTS, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(specials.values()), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    original = Tokenizer(backend, specials)
    assert original.eos_id == 2 and original.add_prefix_space
    original.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert {role: config[role] for role in specials} == specials and config["add_prefix_space"] is True
    for reloaded in (Tokenizer.from_path(tmp_path), Tokenizer.from_path(tmp_path / "tokenizer.json")):
        assert reloaded.special_tokens == specials and reloaded.eos_id == 2
        assert reloaded.encode(HARD_TEXT) == original.encode(HARD_TEXT)
    (tmp_path / "tokenizer.json").unlink()
    from_vocab = Tokenizer.from_path(tmp_path)
    assert from_vocab.eos_id == 2 and from_vocab.encode(HARD_TEXT) == original.encode(HARD_TEXT)
    assert from_vocab.encode("<s>Kancil</s>")[0] == 0  # declared specials match whole


def test_eos_token_given_as_a_dict_and_a_bad_side_file(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": END_OF_TEXT, "lstrip": False, "rstrip": False, "normalized": False}}))
    assert Tokenizer.from_path(tmp_path).eos_id == tokenizer.eos_id
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer_config.json cannot be read as JSON"):
        Tokenizer.from_path(tmp_path)
