from __future__ import annotations

import json

import pytest
from conftest import SAMPLE_TEXTS
from tokenizers import Tokenizer as HFTokenizer

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
    # The boundary: the 256 bytes and <|endoftext|> are 257 tokens.
    with pytest.raises(UserError, match="--vocab-size 256 is too small; a byte-level BPE needs at least 257"):
        Tokenizer.train(["abc"], vocab_size=256)
    assert Tokenizer.train(["abc"], vocab_size=257).vocab_size == 257


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


def with_added_specials(tokenizer: Tokenizer, *tokens: str) -> HFTokenizer:
    """A copy of `tokenizer`'s backend with `tokens` added past its BPE vocabulary, in turn."""
    backend = HFTokenizer.from_str(tokenizer.backend.to_str())
    backend.add_special_tokens(list(tokens))
    return backend


def test_eos_token_given_as_a_dict_and_a_bad_side_file(tmp_path, tokenizer):
    # Not <|endoftext|>, which the vocabulary falls back to: the dict itself must be read.
    backend = with_added_specials(tokenizer, "</s>")
    Tokenizer(backend).save(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>", "lstrip": False, "rstrip": False, "normalized": False}}))
    assert Tokenizer.from_path(tmp_path).eos_id == backend.token_to_id("</s>") != tokenizer.eos_id
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer_config.json cannot be read as JSON"):
        Tokenizer.from_path(tmp_path)


def test_tokens_added_past_the_vocabulary_keep_their_ids_in_vocab_json(tokenizer, tmp_path):
    """vocab.json + merges.txt alone must give the added tokens their ids: re-adding them from the declared
    roles would number <|akhir|> (eos) before <pad>, against the model's embeddings."""
    backend = with_added_specials(tokenizer, "<pad>", "<|akhir|>")
    original = Tokenizer(backend, {"eos_token": "<|akhir|>", "pad_token": "<pad>"})
    original.save(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    reloaded = Tokenizer.from_path(tmp_path)
    assert reloaded.eos_id == original.eos_id == tokenizer.vocab_size + 1
    assert reloaded.token_id("pad_token") == tokenizer.vocab_size
    text = "Tamat.<|akhir|>Budi<pad>"
    assert reloaded.encode(text) == original.encode(text)


def test_declared_specials_are_matched_whole_though_tokenizer_json_does_not_add_them(tmp_path):
    """A tokenizer.json whose vocabulary holds <s> and </s> but whose added_tokens is empty: transformers
    matches the specials tokenizer_config.json declares whole, and so must the ids trained on."""
    from tokenizers import models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(SAMPLE_TEXTS, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(backend.to_str())
    state["added_tokens"] = []
    (tmp_path / "tokenizer.json").write_text(json.dumps(state))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    loaded = Tokenizer.from_path(tmp_path)
    assert loaded.encode("<s>") == [0]
    assert loaded.encode("<s>Kancil</s>") == [0, *loaded.encode("Kancil"), 1]


def test_special_tokens_map_is_ignored_when_tokenizer_config_has_added_tokens_decoder(tokenizer, tmp_path):
    """transformers reads a newer save's (one with added_tokens_decoder) tokenizer_config.json alone; an older
    save's special_tokens_map.json overrides the config."""
    from transformers import AutoTokenizer

    backend = with_added_specials(tokenizer, "</s>")
    Tokenizer(backend).save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = "</s>"
    config["added_tokens_decoder"] = {str(backend.token_to_id("</s>")): {
        "content": "</s>", "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
        "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": END_OF_TEXT}))
    assert Tokenizer.from_path(tmp_path).eos_token == AutoTokenizer.from_pretrained(tmp_path).eos_token == "</s>"
    del config["added_tokens_decoder"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_path(tmp_path).eos_token == AutoTokenizer.from_pretrained(tmp_path).eos_token == END_OF_TEXT


def test_a_save_declares_the_eos_of_eos_id_when_it_is_an_added_special(tokenizer, tmp_path):
    """The model ends text with </s> (eos_id), the declaration says <|endoftext|>: the saved files name </s>,
    so transformers' tokenizer ends text where the model does. An ordinary BPE token is not declared special."""
    backend = with_added_specials(tokenizer, "</s>")
    Tokenizer(backend, {"eos_token": END_OF_TEXT}, eos_id=backend.token_to_id("</s>")).save(tmp_path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((tmp_path / name).read_text())["eos_token"] == "</s>"
    ordinary = tokenizer.encode("a")[0]
    Tokenizer(backend, {"eos_token": END_OF_TEXT}, eos_id=ordinary).save(tmp_path / "ordinary")
    assert json.loads((tmp_path / "ordinary" / "tokenizer_config.json").read_text())["eos_token"] == END_OF_TEXT
