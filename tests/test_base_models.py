"""Base models as they are published: RoBERTa-style tokenizers, a declared end token, a 2021 hub cache.

The Indonesian GPT-2 family trains its byte-level BPE with `<s>`, `<pad>`, `</s>`, `<unk>`, `<mask>` at
ids 0-4 and a prefix space, with `<|endoftext|>` at the last id in some releases and absent in others.
Both kinds are built here, fine-tuned with `train.py --init`, exported, and compared with transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SAMPLE_TEXTS, run_train
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from gpt2kids import data
from gpt2kids.errors import UserError
from gpt2kids.hf import load_tokenizer, resolve
from gpt2kids.tokenizer import END_OF_TEXT, Tokenizer

ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
HUB_ID = "flax-community/gpt2-small-indonesian"
TEXTS = [
    "Pada suatu hari, Sari pergi ke pasar bersama ibunya.",
    "Kancil melompat ke seberang sungai! 🐊🌊 Buaya-buaya menunggu…",
    "Budi suka membaca.\nSetiap malam ayah membacakan dongeng.\n\nTamat.",
    "  Dua spasi di depan, tab\tdi tengah, dan emoji keluarga 👨‍👩‍👧 di akhir ",
    "Rumah <s>Intan</s> punya <pad> dan <mask>: token khusus di dalam teks.",
    "“Kutip” — tanda pisah, angka 3,14 & 100%",
    "",
]


def as_added_token(content: str) -> dict:
    """A special token as transformers writes it into special_tokens_map.json."""
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False}


def roberta_style_bpe(with_end_of_text: bool, vocab_size: int = 400) -> HFTokenizer:
    """A byte-level BPE trained as the Indonesian GPT-2 family's: RoBERTa specials at 0-4, a prefix space."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=ROBERTA_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(SAMPLE_TEXTS, trainer=trainer)
    if with_end_of_text:
        backend.add_special_tokens([END_OF_TEXT])  # the last id, as 50256 in the full-size release
    assert [backend.token_to_id(token) for token in ROBERTA_SPECIALS] == [0, 1, 2, 3, 4]
    return backend


def write_vocab_and_merges(backend: HFTokenizer, folder: Path) -> None:
    state = json.loads(backend.to_str())
    vocab = dict(state["model"]["vocab"])
    for token in state["added_tokens"]:
        vocab.setdefault(token["content"], token["id"])
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in state["model"]["merges"]]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")


# The two releases: the declared end token, and how its side files declare the special tokens.
VARIANTS = {
    # <|endoftext|> at the last id; special_tokens_map.json in transformers' dict form, config bare.
    "with-endoftext": dict(with_end_of_text=True, eos=END_OF_TEXT, config_specials={}, map_specials={
        "bos_token": as_added_token(END_OF_TEXT), "eos_token": as_added_token(END_OF_TEXT),
        "unk_token": as_added_token(END_OF_TEXT), "pad_token": as_added_token("<pad>"),
        "mask_token": as_added_token("<mask>")}),
    # No <|endoftext|>: </s> is the end token; plain strings in both files.
    "without-endoftext": dict(with_end_of_text=False, eos="</s>", config_specials={
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"},
        map_specials={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                      "mask_token": "<mask>"}),
}
DECLARED = {name: {role: value["content"] if isinstance(value, dict) else value
                   for role, value in variant["map_specials"].items()} for name, variant in VARIANTS.items()}


def write_tokenizer_files(backend: HFTokenizer, folder: Path, variant: dict, *, tokenizer_json: bool = True,
                          add_prefix_space: bool | None = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_json:
        backend.save(str(folder / "tokenizer.json"))
    write_vocab_and_merges(backend, folder)
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 64, "errors": "replace",
              **variant["config_specials"]}
    if add_prefix_space is not None:
        config["add_prefix_space"] = add_prefix_space
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(variant["map_specials"], indent=2))


def save_base_model(folder: Path, backend: HFTokenizer, eos_id: int, n_positions: int = 64, seed: int = 0):
    """A small random transformers GPT-2 whose config names `eos_id` for bos and eos."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=backend.get_vocab_size(), n_positions=n_positions, n_embd=32, n_layer=2,
                        n_head=2, bos_token_id=eos_id, eos_token_id=eos_id)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def base_model(request, tmp_path_factory) -> tuple[str, Path]:
    """(variant name, an HF folder holding a small GPT-2 and its RoBERTa-style tokenizer)."""
    variant = VARIANTS[request.param]
    backend = roberta_style_bpe(variant["with_end_of_text"])
    folder = tmp_path_factory.mktemp(f"base-{request.param}")
    save_base_model(folder, backend, backend.token_to_id(variant["eos"]))
    write_tokenizer_files(backend, folder, variant)
    return request.param, folder


@pytest.fixture(scope="module")
def fine_tuned(base_model, corpus, tmp_path_factory) -> tuple[str, Path, Path]:
    """(variant, base folder, the `final/` export of a short `train.py --init` run from it)."""
    name, folder = base_model
    out = tmp_path_factory.mktemp(f"run-{name}") / "run"
    result = run_train("--init", str(folder), "--epochs", "1", "--max-steps", "2", "--batch-size", "2",
                       "--block-size", "32", "--precision", "fp32", "--device", "cpu", "--data", str(corpus),
                       "--out", str(out))
    assert result.returncode == 0, result.stderr
    return name, folder, out / "final"


# --- loading: the declared end token, ids as transformers gives them --------------------------------

def test_the_declared_end_token_is_used_and_ids_match_transformers(base_model):
    from transformers import AutoTokenizer

    name, folder = base_model
    reference = AutoTokenizer.from_pretrained(folder)
    for tokenizer in (Tokenizer.from_path(folder), load_tokenizer(folder)):
        assert tokenizer.eos_token == VARIANTS[name]["eos"]
        assert tokenizer.eos_id == reference.eos_token_id
        assert tokenizer.special_tokens == DECLARED[name]
        assert tokenizer.add_prefix_space
        for text in TEXTS:
            assert tokenizer.encode(text) == reference(text)["input_ids"], text
    tokenizer = Tokenizer.from_path(folder)
    assert tokenizer.decode(tokenizer.encode("Pada")) == " Pada"  # the prefix space is really added


def test_packed_stories_end_with_the_declared_token(base_model):
    name, folder = base_model
    tokenizer = load_tokenizer(folder)
    stories = ["Sari pergi ke pasar.", "Kancil melompat."]
    ids = data.tokenize_stories(stories, tokenizer, use_cache=False).tolist()
    first = tokenizer.encode(stories[0])
    assert ids == [*first, tokenizer.eos_id, *tokenizer.encode(stories[1]), tokenizer.eos_id]
    assert tokenizer.eos_id == {"with-endoftext": 400, "without-endoftext": 2}[name]


def test_vocab_and_merges_alone_read_like_tokenizer_json(base_model, tmp_path):
    from transformers import AutoTokenizer

    _, folder = base_model
    shutil.copytree(folder, tmp_path / "slow")
    (tmp_path / "slow" / "tokenizer.json").unlink()
    ours = load_tokenizer(tmp_path / "slow")
    reference = AutoTokenizer.from_pretrained(tmp_path / "slow")
    assert ours.eos_id == load_tokenizer(folder).eos_id == reference.eos_token_id
    for text in TEXTS:
        assert ours.encode(text) == reference(text)["input_ids"], text


def test_the_models_eos_token_id_wins_over_the_tokenizers_declaration(tmp_path, capsys):
    """transformers' generate stops at the model's eos_token_id; training must end stories with the same."""
    backend = roberta_style_bpe(with_end_of_text=True)
    variant = VARIANTS["with-endoftext"]  # declares <|endoftext|> (400)
    write_tokenizer_files(backend, tmp_path, variant)
    save_base_model(tmp_path, backend, eos_id=2)  # but the model ends text with </s>
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.eos_id == 2 and tokenizer.eos_token == "</s>"
    assert "declares eos_token '<|endoftext|>'" in capsys.readouterr().err
    # Without the model's word, the declaration decides.
    assert Tokenizer.from_path(tmp_path).eos_id == 400


def test_an_eos_token_id_outside_the_tokenizer_falls_back_to_the_declared_token(tmp_path, capsys):
    backend = roberta_style_bpe(with_end_of_text=False)
    write_tokenizer_files(backend, tmp_path, VARIANTS["without-endoftext"])
    save_base_model(tmp_path, backend, eos_id=2)
    config = json.loads((tmp_path / "config.json").read_text())
    config["eos_token_id"] = 50256  # the full-size id, in a vocabulary of 400
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").unlink(missing_ok=True)
    assert load_tokenizer(tmp_path).eos_id == 2
    assert "eos_token_id 50256 is not a token" in capsys.readouterr().err


def test_a_tokenizer_with_no_end_token_at_all_is_refused(tmp_path):
    backend = roberta_style_bpe(with_end_of_text=False)
    backend.save(str(tmp_path / "tokenizer.json"))  # no side files, no <|endoftext|>, no config.json
    with pytest.raises(UserError, match="no end-of-text token"):
        Tokenizer.from_path(tmp_path)
    # The model's config alone is enough.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "eos_token_id": 2}))
    assert load_tokenizer(tmp_path).eos_token == "</s>"


@pytest.mark.parametrize("side_files", ["config without add_prefix_space", "no tokenizer_config.json"])
def test_tokenizer_config_add_prefix_space_decides_as_in_transformers(tmp_path, side_files):
    """transformers' GPT2Tokenizer sets the pre-tokenizer from tokenizer_config.json (default False),
    whatever tokenizer.json says; the base model learned from those ids."""
    from transformers import AutoTokenizer

    backend = roberta_style_bpe(with_end_of_text=False)
    write_tokenizer_files(backend, tmp_path, VARIANTS["without-endoftext"], add_prefix_space=None)
    save_base_model(tmp_path, backend, eos_id=2)
    if side_files == "no tokenizer_config.json":
        (tmp_path / "tokenizer_config.json").unlink()
    ours = Tokenizer.from_path(tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    assert not ours.add_prefix_space
    assert ours.encode("Pada suatu hari") != backend.encode("Pada suatu hari").ids  # tokenizer.json alone differs
    for text in TEXTS:
        assert ours.encode(text) == reference(text)["input_ids"], text


def tokenizer_folder(tmp_path: Path, case: str) -> Path:
    """Tokenizer folders as other tools save them, each read by transformers in a way of its own."""
    from tokenizers import AddedToken

    folder = tmp_path / case
    folder.mkdir()
    if case == "mask with lstrip":  # RoBERTa's convention: "<mask>" takes the space before it
        backend = roberta_style_bpe(with_end_of_text=False)
        backend.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False)])
        write_tokenizer_files(backend, folder, VARIANTS["without-endoftext"])
    elif case in ("PreTrainedTokenizerFast", "TokenizersBackend"):  # tokenizer.json's prefix space stands
        backend = roberta_style_bpe(with_end_of_text=True)
        backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": case, "add_prefix_space": False, "eos_token": END_OF_TEXT}))
    elif case in ("added_tokens.json", "added_tokens_decoder"):  # a slow tokenizer's save, tokens added past
        backend = roberta_style_bpe(with_end_of_text=True)             # the vocabulary at their own ids
        write_vocab_and_merges(backend, folder)
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": True, "eos_token": END_OF_TEXT,
                  "pad_token": "[PAD]", "mask_token": "[MASK]"}
        first = backend.get_vocab_size()
        if case == "added_tokens.json":
            (folder / "added_tokens.json").write_text(json.dumps({"[TOKOH]": first}))
            backend.add_tokens(["[TOKOH]"])
        else:  # [MASK] before [PAD], against the order of their roles
            config["added_tokens_decoder"] = {str(first): {**as_added_token("[MASK]"), "special": True},
                                              str(first + 1): {**as_added_token("[PAD]"), "special": True}}
            backend.add_special_tokens(["[MASK]", "[PAD]"])
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    else:  # "vocab and merges, eos only": GPT2Tokenizer keeps <|endoftext|> as bos and unk
        backend = roberta_style_bpe(with_end_of_text=True)
        write_vocab_and_merges(backend, folder)
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": True, "eos_token": "</s>"}))
    save_base_model(folder, backend, eos_id=2)
    return folder


@pytest.mark.parametrize("case", ["mask with lstrip", "PreTrainedTokenizerFast", "TokenizersBackend",
                                  "vocab and merges, eos only", "added_tokens.json", "added_tokens_decoder"])
def test_tokenizer_folders_of_other_tools_read_and_save_as_transformers_reads_them(tmp_path, case):
    from transformers import AutoTokenizer

    folder = tokenizer_folder(tmp_path, case)
    ours, reference = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    texts = [*TEXTS, "Budi suka <mask> buku", "Tamat.<|endoftext|>Mulai", "Lalu [TOKOH] pergi", "a [PAD] b [MASK]"]
    for text in texts:
        assert ours.encode(text) == reference(text)["input_ids"], text
    ours.save(tmp_path / "saved")  # what an export writes reads back the same in transformers
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in texts:
        assert saved(text)["input_ids"] == reference(text)["input_ids"], text


def test_an_added_token_whose_id_cannot_be_kept_is_refused(tmp_path):
    backend = roberta_style_bpe(with_end_of_text=True)
    write_vocab_and_merges(backend, tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[TOKOH]": backend.get_vocab_size() + 5}))
    with pytest.raises(UserError, match=r"gives the added token '\[TOKOH\]' the id \d+, which is not the next free"):
        Tokenizer.from_path(tmp_path)


def test_an_added_token_whose_id_is_not_a_number_is_skipped(tmp_path):
    backend = roberta_style_bpe(with_end_of_text=True)
    write_vocab_and_merges(backend, tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[TOKOH]": True, "[LAIN]": "7"}))
    tokenizer = Tokenizer.from_path(tmp_path)
    assert tokenizer.vocab_size == backend.get_vocab_size()
    assert tokenizer.backend.token_to_id("[TOKOH]") is None


def test_a_tokenizer_trained_here_keeps_end_of_text(tmp_path):
    tokenizer = Tokenizer.train(SAMPLE_TEXTS, vocab_size=300)
    tokenizer.save(tmp_path)
    assert tokenizer.eos_token == END_OF_TEXT
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["eos_token"] == saved["bos_token"] == saved["unk_token"] == END_OF_TEXT
    assert saved["add_prefix_space"] is False


# --- fine-tuning, the export, and generating from it -----------------------------------------------

def test_fine_tuning_changes_the_weights_and_the_export_names_the_declared_end(fine_tuned):
    name, folder, final = fine_tuned
    eos_id = {"with-endoftext": 400, "without-endoftext": 2}[name]
    before = load_file(folder / "model.safetensors")["transformer.wte.weight"]
    after = load_file(final / "model.safetensors")["transformer.wte.weight"]
    assert before.shape == after.shape and not torch.equal(before, after)
    assert json.loads((final / "config.json").read_text())["eos_token_id"] == eos_id
    generation = json.loads((final / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eos_id
    assert generation["pad_token_id"] == 1  # the declared <pad>
    saved = json.loads((final / "tokenizer_config.json").read_text())
    assert {role: saved[role] for role in DECLARED[name]} == DECLARED[name]
    assert saved["add_prefix_space"] is True
    assert json.loads((final / "special_tokens_map.json").read_text()) == DECLARED[name]


def test_the_export_encodes_exactly_like_the_original(fine_tuned):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _, folder, final = fine_tuned
    original = AutoTokenizer.from_pretrained(folder)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(final / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(final)
    ours = Tokenizer.from_path(final)
    for text in TEXTS:
        expected = original(text)["input_ids"]
        assert fast(text)["input_ids"] == expected, text
        assert auto(text)["input_ids"] == expected, text
        assert ours.encode(text) == expected, text
    for role in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token"):
        assert getattr(auto, role) == getattr(original, role), role
    assert auto.eos_token_id == ours.eos_id == json.loads((final / "config.json").read_text())["eos_token_id"]


def hidden_states_of(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The last layer's (ln_f'd) hidden states and the logits, for one sequence."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0], out.logits[0]


def test_generate_greedy_equals_transformers_and_stops_at_the_declared_end(fine_tuned, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    name, _, final = fine_tuned
    eos_id = {"with-endoftext": 400, "without-endoftext": 2}[name]
    prompt, stop_at, max_new = "Pada suatu hari", 4, 12
    tokenizer = Tokenizer.from_path(final)
    prompt_ids = tokenizer.encode(prompt)
    assert AutoTokenizer.from_pretrained(final)(prompt)["input_ids"] == prompt_ids

    # Greedy continuation of the fine-tuned weights, with no stop.
    model = GPT2LMHeadModel.from_pretrained(final).eval()
    ids = list(prompt_ids)
    for _ in range(stop_at + 1):
        ids.append(int(hidden_states_of(model, ids)[1][-1].argmax()))
    hidden, logits = hidden_states_of(model, ids)
    steps = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + stop_at + 1)  # positions predicting new tokens
    assert all(int(logits[position].argmax()) != eos_id for position in steps)

    # Make the end token the argmax at new token `stop_at` only: move its (tied) embedding row along the
    # part of that step's hidden state orthogonal to the earlier steps', so earlier logits are unchanged.
    earlier = hidden[list(steps)[:stop_at]]
    target = hidden[list(steps)[stop_at]]
    basis, _ = torch.linalg.qr(earlier.T.double())
    direction = (target.double() - basis @ (basis.T @ target.double())).float()
    direction /= direction.norm()
    gap = float(logits[list(steps)[stop_at]].max() - logits[list(steps)[stop_at], eos_id])
    # A margin of 5 logits: far beyond the ~1e-5 by which two fp32 implementations' logits differ.
    scale = (gap + 5.0) / float(target @ direction)
    biased = tmp_path / "biased"
    shutil.copytree(final, biased)
    weights = load_file(biased / "model.safetensors")
    weights["transformer.wte.weight"][eos_id] += scale * direction
    save_file(weights, biased / "model.safetensors", metadata={"format": "pt"})

    reference = GPT2LMHeadModel.from_pretrained(biased).eval()
    inputs = torch.tensor([prompt_ids])
    with torch.no_grad():  # the eos id comes from the export's own generation config
        out = reference.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                 max_new_tokens=max_new)
    new = out[0, len(prompt_ids):].tolist()
    assert new == [*ids[len(prompt_ids):len(prompt_ids) + stop_at], eos_id]  # stopped at the end token

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run([sys.executable, "generate.py", "--greedy", "--format", "jsonl", "--precision", "fp32",
                             "--max-new-tokens", str(max_new), "--model", str(biased), prompt], cwd=REPO, env=env,
                            capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert result.returncode == 0, result.stderr
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["new_tokens"] == stop_at  # the end token ends the sequence and is not printed
    assert record["completion"] == tokenizer.decode(new[:-1])


def test_a_resumed_run_keeps_the_declared_special_tokens(base_model, corpus, tmp_path):
    from conftest import config_for

    from gpt2kids.training import prepare_run, train

    name, folder = base_model
    settings = dict(epochs=1, batch_size=2, block_size=32)
    train(config_for(folder, corpus, tmp_path / "run", max_steps=1, **settings))
    resumed = prepare_run(config_for(folder, corpus, tmp_path / "run", resume=True, max_steps=2, **settings))
    assert resumed.tokenizer.eos_token == VARIANTS[name]["eos"]
    assert resumed.tokenizer.special_tokens == DECLARED[name]


# --- `python train.py` offline from the hub cache --------------------------------------------------

def legacy_config(model) -> dict:
    """config.json as transformers 4.9 wrote it for the Flax community models."""
    config = model.config
    return {
        "_name_or_path": ".", "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.0, "bos_token_id": config.bos_token_id, "embd_pdrop": 0.0,
        "eos_token_id": config.eos_token_id, "gradient_checkpointing": False, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": config.n_positions, "n_embd": config.n_embd,
        "n_head": config.n_head, "n_inner": None, "n_layer": config.n_layer, "n_positions": config.n_positions,
        "resid_pdrop": 0.0, "scale_attn_weights": True, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "torch_dtype": "float32", "transformers_version": "4.9.0.dev0", "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def legacy_state_dict(model) -> dict[str, torch.Tensor]:
    """A 2021 `pytorch_model.bin`: every weight, the tied lm_head, and the attention mask buffers."""
    state = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight.detach().clone()
    n = model.config.n_positions
    for layer in range(model.config.n_layer):
        state[f"transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


def lay_out_hub_cache(hub: Path) -> tuple[Path, object, int]:
    """A 2021 save of a small GPT-2 in huggingface_hub's cache layout under `hub` (HF_HOME/hub):
    models--OWNER--NAME/refs/main names a commit, snapshots/COMMIT holds the files.
    Returns (the snapshot folder, the transformers model, its eos id)."""
    backend = roberta_style_bpe(with_end_of_text=True)
    eos_id = backend.token_to_id(END_OF_TEXT)
    model = save_base_model(hub.parent / "source", backend, eos_id, n_positions=32)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    write_tokenizer_files(backend, snapshot, VARIANTS["with-endoftext"], tokenizer_json=False)  # vocab + merges
    (snapshot / "config.json").write_text(json.dumps(legacy_config(model), indent=2))
    torch.save(legacy_state_dict(model), snapshot / "pytorch_model.bin")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot, model, eos_id


def test_train_with_no_init_runs_offline_from_the_hub_cache(tmp_path, monkeypatch):
    snapshot, model, eos_id = lay_out_hub_cache(tmp_path / "hf-home" / "hub")
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # would override HF_HOME
        monkeypatch.delenv(name, raising=False)
    # The layout is the one huggingface_hub reads (checked in a fresh process: it reads HF_HOME at import).
    check = subprocess.run([sys.executable, "-c", "from huggingface_hub import snapshot_download as s; "
                            f"print(s({HUB_ID!r}, local_files_only=True))"],
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert Path(check.stdout.strip()) == snapshot

    out = tmp_path / "run"
    result = run_train("--max-steps", "1", "--out", str(out), "--device", "cpu", "--precision", "fp32",
                       "--batch-size", "2", "--block-size", "32", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "train_config.json").read_text())["init"] == HUB_ID
    final = out / "final"
    assert json.loads((final / "config.json").read_text())["eos_token_id"] == eos_id
    assert HUB_ID in (final / "README.md").read_text()
    before = legacy_state_dict(model)["transformer.wte.weight"]
    assert not torch.equal(load_file(final / "model.safetensors")["transformer.wte.weight"], before)


def test_a_cached_snapshot_is_used_when_the_hub_cannot_be_asked(tmp_path, monkeypatch):
    """No network, or a cache whose file listing names files never fetched: the cached copy still serves."""
    import huggingface_hub
    from huggingface_hub import constants

    def unreachable(*args, **kwargs):
        raise OSError("the hub cannot be reached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match="could not be fetched"):
        resolve(HUB_ID)
    snapshot, _, _ = lay_out_hub_cache(tmp_path / "hub")
    assert resolve(HUB_ID) == snapshot
