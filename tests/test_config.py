from __future__ import annotations

import json

import pytest

from gpt2kids.config import PRESETS, GPT2Config, preset
from gpt2kids.errors import UserError


def test_hf_config_round_trip_and_transformers_reads_it(tmp_path):
    from transformers import GPT2Config as HFConfig

    ours = GPT2Config(vocab_size=1000, n_positions=128, n_embd=64, n_layer=3, n_head=4, n_inner=200,
                      layer_norm_epsilon=1e-6, resid_pdrop=0.0, bos_token_id=999, eos_token_id=999)
    (tmp_path / "config.json").write_text(json.dumps(ours.to_hf_dict()))
    assert GPT2Config.from_json_file(tmp_path / "config.json") == ours
    theirs = HFConfig.from_pretrained(tmp_path)
    assert (theirs.n_embd, theirs.n_layer, theirs.n_head, theirs.n_inner) == (64, 3, 4, 200)
    assert theirs.layer_norm_epsilon == 1e-6
    assert GPT2Config.from_hf_dict(theirs.to_dict()) == ours


def test_presets():
    tiny = preset("tiny", vocab_size=8000, eos_token_id=0)
    assert (tiny.n_layer, tiny.n_head, tiny.n_embd, tiny.n_positions, tiny.vocab_size) == (4, 4, 256, 256, 8000)
    assert PRESETS["small"].num_parameters() == 124_439_808
    with pytest.raises(UserError, match="unknown model size"):
        preset("huge", 10, 0)


@pytest.mark.parametrize("bad, message", [
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"model_type": "gpt2", "n_layer": 10**9}, "n_layer=1000000000 is absurd"),
    ({"model_type": "gpt2", "n_embd": 100, "n_head": 3}, "not divisible"),
    ({"model_type": "gpt2", "n_layer": -1}, "positive integer"),
    ({"model_type": "gpt2", "n_positions": "1024"}, "positive integer"),
    ({"model_type": "gpt2", "activation_function": "tanh"}, "not supported"),
    ({"model_type": "gpt2", "n_inner": True}, "n_inner=True must be a positive integer"),
    ({"model_type": "gpt2", "eos_token_id": "x"}, "eos_token_id must be a token id"),
    ({"model_type": "gpt2", "bos_token_id": -1}, "bos_token_id must be a token id"),
    ({"model_type": "gpt2", "reorder_and_upcast_attn": True}, "supports only"),
    ({"model_type": "gpt2", "n_embd": 16384, "n_layer": 200, "n_head": 16}, "parameters is absurd"),
])
def test_bad_configs_are_refused_with_a_clear_message(bad, message):
    with pytest.raises(UserError, match=message):
        GPT2Config.from_hf_dict(bad)


def test_old_configs_with_n_ctx_only(tmp_path):
    # Several end ids (as some configs list them): gpt2kids stops at one, the first.
    config = GPT2Config.from_hf_dict({"model_type": "gpt2", "n_ctx": 512, "eos_token_id": [7, 9],
                                      "bos_token_id": [5, 6]})
    assert config.n_positions == 512 and (config.eos_token_id, config.bos_token_id) == (7, 5)


def test_config_file_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(UserError, match="not valid JSON"):
        GPT2Config.from_json_file(tmp_path / "config.json")
