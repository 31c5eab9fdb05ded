from __future__ import annotations

import json

import pytest
import torch

from gpt2kids import data
from gpt2kids.errors import UserError
from gpt2kids.model import IGNORE_INDEX


def test_bundled_corpus_is_big_enough_and_every_story_has_a_title():
    files = sorted(data.BUNDLED_STORIES.glob("*.txt"))
    assert len(files) >= 40
    assert sum(f.stat().st_size for f in files) >= 60_000
    for file in files:
        title, blank, *body = file.read_text(encoding="utf-8").split("\n")
        assert title.strip() and len(title) < 80 and blank == "" and len(" ".join(body)) > 500, file.name
    assert len(data.read_stories(data.BUNDLED_STORIES)) == len(files)


def test_folder_with_bom_crlf_and_a_binary_file(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes("\ufeffJudul A\r\n\r\nIsi cerita A.\r\n".encode())
    (tmp_path / "b.txt").write_text("Judul B\n\nIsi cerita B.\n", encoding="utf-8")
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert data.read_stories(tmp_path) == ["Judul A\n\nIsi cerita A.", "Judul B\n\nIsi cerita B."]
    warning = capsys.readouterr().err
    assert "picture.png" in warning and "latin1.txt" in warning


def test_txt_file_of_blank_line_separated_stories(tmp_path):
    (tmp_path / "stories.txt").write_text("Satu.\n\n\nDua, baris satu.\nDua, baris dua.\n \nTiga.\n")
    assert data.read_stories(tmp_path / "stories.txt") == ["Satu.", "Dua, baris satu.\nDua, baris dua.", "Tiga."]


def test_jsonl(tmp_path):
    path = tmp_path / "stories.jsonl"
    path.write_text(json.dumps({"text": "Satu."}) + "\n\n" + json.dumps({"text": "Dua.", "id": 2}) + "\n")
    assert data.read_stories(path) == ["Satu.", "Dua."]


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": "broken'], "line 2 is not valid JSON"),
    (['{"text": "ok"}', '{"title": "x"}'], 'line 2 has no "text"'),
    (['["text"]'], 'line 1 has no "text"'),
    (['{"text": "ok"}', '{"text": "Satu \\ud800 cerita."}'], 'line 2: its "text" holds a lone surrogate'),
])
def test_bad_jsonl_names_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message):
        data.read_stories(path)


def test_upper_case_suffixes_are_read_as_their_kind(tmp_path):
    (tmp_path / "STORIES.JSONL").write_text(json.dumps({"text": "Satu."}) + "\n" + json.dumps({"text": "Dua."}) + "\n")
    assert data.read_stories(tmp_path / "STORIES.JSONL") == ["Satu.", "Dua."]  # not one story of raw JSON
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "A.TXT").write_text("Tiga.")
    assert data.read_stories(tmp_path / "folder") == ["Tiga."]


def test_missing_and_empty_corpora(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.read_stories(tmp_path / "nope")
    with pytest.raises(UserError, match="holds no stories"):
        data.read_stories(tmp_path)
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(UserError, match="holds no stories"):
        data.read_stories(tmp_path)
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)))
    with pytest.raises(UserError, match="holds no stories"):
        data.read_stories(tmp_path)


def test_split_is_by_story_deterministic_and_seeded():
    stories = [f"cerita {i}" for i in range(50)]
    train, held_out = data.split_stories(stories, 0.1, seed=42)
    assert len(held_out) == 5 and len(train) == 45
    assert sorted(train + held_out) == sorted(stories) and not set(train) & set(held_out)
    assert data.split_stories(stories, 0.1, seed=42) == (train, held_out)
    assert data.split_stories(stories, 0.1, seed=7)[1] != held_out
    with pytest.raises(UserError, match="at least 2"):
        data.split_stories(["satu"], 0.1, seed=42)
    assert data.split_stories(["satu"], 0.0, seed=42) == (["satu"], [])
    # A fraction that rounds to no story still holds one out, and one that rounds to all of them leaves one in.
    assert [len(part) for part in data.split_stories(stories[:3], 0.1, seed=42)] == [2, 1]
    assert [len(part) for part in data.split_stories(stories[:2], 0.9, seed=42)] == [1, 1]


def test_blocks_predict_the_next_token_and_padding_has_no_target():
    stream = torch.arange(10)
    blocks = data.pack_blocks(stream, block_size=4, pad_id=99)
    assert blocks.inputs.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 99, 99]]
    assert blocks.targets.tolist() == [[1, 2, 3, IGNORE_INDEX], [5, 6, 7, IGNORE_INDEX],
                                       [9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert blocks.token_count == 7


def test_a_last_token_alone_in_its_block_gives_no_block():
    # Nine tokens in blocks of 4: the ninth would start a block with no target, a training step of no data.
    blocks = data.pack_blocks(torch.arange(9), block_size=4, pad_id=99)
    assert blocks.inputs.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert blocks.token_count == 6
    assert len(data.pack_blocks(torch.arange(1), block_size=4, pad_id=99)) == 0
    assert len(data.pack_blocks(torch.arange(8), block_size=4, pad_id=99)) == 2


def test_stories_end_with_end_of_text_and_tokens_are_cached(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2KIDS_CACHE", str(tmp_path))
    stories = ["Satu dua tiga.", "Empat lima."]
    stream = data.tokenize_stories(stories, tokenizer)
    first, second = tokenizer.encode(stories[0]), tokenizer.encode(stories[1])
    assert stream.tolist() == [*first, tokenizer.eos_id, *second, tokenizer.eos_id]
    assert len(list((tmp_path / "tokens").glob("*.safetensors"))) == 1

    def no_tokenizing(_texts):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(tokenizer, "encode_batch", no_tokenizing)
    assert torch.equal(data.tokenize_stories(stories, tokenizer), stream)
    with pytest.raises(AssertionError, match="tokenized again"):  # other contents: a different key
        data.tokenize_stories(["Cerita lain."], tokenizer)


def test_a_token_cache_that_cannot_be_written_costs_a_warning_only(tokenizer, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):  # what safetensors raised on a full tmpfs (0.8), not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setenv("GPT2KIDS_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "save_file", full_disk)
    stories = ["Satu dua tiga.", "Empat lima."]
    stream = data.tokenize_stories(stories, tokenizer)
    assert stream.tolist() == data.tokenize_stories(stories, tokenizer, use_cache=False).tolist()
    assert "could not write the token cache" in capsys.readouterr().err
    assert not list((tmp_path / "tokens").iterdir())


def test_a_cache_entry_that_parses_but_holds_other_ids_is_tokenized_again(tokenizer, tmp_path, monkeypatch, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    monkeypatch.setenv("GPT2KIDS_CACHE", str(tmp_path))
    stories = ["Satu dua tiga.", "Empat lima."]
    stream = data.tokenize_stories(stories, tokenizer)
    [entry] = (tmp_path / "tokens").glob("*.safetensors")
    with safe_open(entry, "pt") as cached:
        metadata = cached.metadata()
    save_file({"ids": torch.zeros(len(stream), dtype=torch.int32)}, entry, metadata=metadata)  # zeroed data
    assert torch.equal(data.tokenize_stories(stories, tokenizer), stream)
    assert "is damaged; tokenizing again" in capsys.readouterr().err


def test_held_out_stories_that_are_training_stories_too_are_named(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("Satu.")
    (tmp_path / "b.txt").write_text("Dua.")
    train, held_out = data.load_split(tmp_path, tmp_path, 0.1, seed=1)  # --eval-data the same as --data
    assert held_out == train
    assert "2 of the 2 held-out stories are training stories too" in capsys.readouterr().err
    data.load_split(tmp_path, None, 0.5, seed=1)
    assert "training stories too" not in capsys.readouterr().err


def test_step_plan_covers_each_block_once_per_epoch_and_ranks_split_micro_batches():
    plan = data.StepPlan(num_blocks=23, batch_size=2, grad_accum=3, world_size=2)
    assert plan.micro_batches_per_epoch == 6 and plan.steps_per_epoch == 2
    order = data.epoch_order(23, seed=1, epoch=0)
    seen = []
    for step in range(plan.steps_per_epoch):
        for micro_batch in plan.step_blocks(order, step):
            seen += plan.rank_slice(micro_batch, 0).tolist() + plan.rank_slice(micro_batch, 1).tolist()
    assert sorted(seen) == list(range(23))
    assert torch.equal(data.epoch_order(23, 1, 0), order)
    assert not torch.equal(data.epoch_order(23, 1, 1), order)


def test_different_story_lists_never_share_a_cache_key(tokenizer):
    # A story may hold any character a .jsonl can carry, NUL included: lengths, not separators, keep them apart.
    assert data.cache_key(["Satu\x00story\x00Dua"], tokenizer) != data.cache_key(["Satu", "Dua"], tokenizer)
    # As many stories, the same bytes cut elsewhere: only each story's own length tells these apart.
    assert data.cache_key(["a\x00b", "c"], tokenizer) != data.cache_key(["a", "b\x00c"], tokenizer)
    assert data.corpus_digest(["a\x00b", "c"], []) != data.corpus_digest(["a", "b\x00c"], [])
    assert data.corpus_digest(["a", "b"], []) != data.corpus_digest(["a"], ["b"])
    # The held-out stories count too: a resume on another --eval-data would evaluate on other text.
    assert data.corpus_digest(["a"], ["b"]) != data.corpus_digest(["a"], ["c"])


def test_token_cache_is_keyed_by_the_tokenizer_too(tokenizer, tmp_path, monkeypatch):
    from conftest import SAMPLE_TEXTS

    from gpt2kids.tokenizer import Tokenizer

    monkeypatch.setenv("GPT2KIDS_CACHE", str(tmp_path))
    stories = ["Kancil melompat ke seberang sungai.", "Sari pergi ke pasar bersama ibunya."]
    other = Tokenizer.train(SAMPLE_TEXTS, vocab_size=300)
    expected = {}
    for name, tok in (("session", tokenizer), ("other", other)):
        expected[name] = [token for story in stories for token in [*tok.encode(story), tok.eos_id]]
    assert expected["session"] != expected["other"]  # the two tokenizers really split the stories differently

    first = data.tokenize_stories(stories, tokenizer)
    second = data.tokenize_stories(stories, other)  # a cache keyed by the stories alone would return `first`
    assert first.tolist() == expected["session"] and second.tolist() == expected["other"]
    assert len(list((tmp_path / "tokens").glob("*.safetensors"))) == 2
    assert data.cache_key(stories, tokenizer) != data.cache_key(stories, other)

    def no_tokenizing(_texts):
        raise AssertionError("tokenized again despite the cache")

    for tok in (tokenizer, other):
        monkeypatch.setattr(tok, "encode_batch", no_tokenizing)
    # Both now come from the cache, each with its own tokenizer's ids.
    assert data.tokenize_stories(stories, tokenizer).tolist() == expected["session"]
    assert data.tokenize_stories(stories, other).tolist() == expected["other"]


def test_token_cache_is_keyed_by_the_end_of_text_id_too(tokenizer, tmp_path, monkeypatch):
    """The same BPE under a model whose eos_token_id names another token ends each story with that id."""
    from gpt2kids.tokenizer import Tokenizer

    monkeypatch.setenv("GPT2KIDS_CACHE", str(tmp_path))
    other = Tokenizer.from_json_string(tokenizer.backend.to_str(), tokenizer.special_tokens, tokenizer.vocab_size - 1)
    assert other.eos_id != tokenizer.eos_id and other.encode("Satu dua.") == tokenizer.encode("Satu dua.")
    stories = ["Kancil melompat ke seberang sungai.", "Sari pergi ke pasar bersama ibunya."]
    assert data.tokenize_stories(stories, tokenizer)[-1] == tokenizer.eos_id
    ended = data.tokenize_stories(stories, other)  # a key without the eos id would return the stream above
    assert ended.tolist() == [token for story in stories for token in [*other.encode(story), other.eos_id]]
    assert data.cache_key(stories, tokenizer) != data.cache_key(stories, other)


def test_stories_that_give_no_training_tokens_are_refused(tokenizer):
    # Blocks of one token have no next token inside the block to predict: nothing to train on.
    with pytest.raises(UserError, match="give no training tokens at --block-size 1; add stories or raise"):
        data.build_dataset(["Satu dua tiga.", "Empat lima."], [], tokenizer, block_size=1)
    assert data.build_dataset(["Satu dua tiga.", "Empat lima."], [], tokenizer, block_size=2).train.token_count > 0


def test_a_folder_gives_its_txt_files_and_skips_hidden_folders(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("Judul A\n\nIsi A.", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("Judul B\n\nIsi B.", encoding="utf-8")
    (tmp_path / "README.md").write_text("# not a story", encoding="utf-8")
    (tmp_path / "notes.json").write_text("{}", encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD.txt").write_text("ref: refs/heads/main", encoding="utf-8")
    assert data.read_stories(tmp_path) == ["Judul A\n\nIsi A.", "Judul B\n\nIsi B."]
    warning = capsys.readouterr().err
    assert "skipped 2 other file(s)" in warning and "README.md" in warning and "HEAD" not in warning


def test_a_folder_skips_the_runs_and_models_inside_it(tmp_path, capsys):
    """`--out` inside `--data` (or `--data .` above runs/): an export's merges.txt is no story."""
    (tmp_path / "a.txt").write_text("Judul A\n\nIsi A.", encoding="utf-8")
    (tmp_path / "more" / "b.txt").parent.mkdir()
    (tmp_path / "more" / "b.txt").write_text("Judul B\n\nIsi B.", encoding="utf-8")
    (tmp_path / "more" / "config.json").write_text("{}", encoding="utf-8")  # a dataset's own: no weights beside it
    run, model = tmp_path / "runs" / "first", tmp_path / "model"
    markers = {run: ["train_config.json"], run / "best": ["config.json", "model.safetensors"],
               model: ["config.json", "pytorch_model.bin"]}
    for folder, names in markers.items():
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_text("{}", encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\na b", encoding="utf-8")
    assert data.read_stories(tmp_path) == ["Judul A\n\nIsi A.", "Judul B\n\nIsi B."]
    warning = capsys.readouterr().err
    assert "skipped 2 run or model folder(s)" in warning and "model/, runs/first/" in warning


@pytest.mark.parametrize("kind", ["run", "model"])
def test_a_run_or_model_folder_given_as_the_stories_is_refused(tmp_path, kind):
    names = ["train_config.json"] if kind == "run" else ["config.json", "model.safetensors"]
    for name in names:
        (tmp_path / name).write_text("{}", encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b", encoding="utf-8")
    with pytest.raises(UserError, match=f"^--data {tmp_path} is a {kind} folder, not stories; pass the stories"):
        data.read_stories(tmp_path)


def test_epoch_order_takes_any_seed_train_py_accepts():
    # seed * 1_000_003 + epoch overflows torch.manual_seed's 64 bits for seeds above about 9e12.
    order = data.epoch_order(10, 2**63 - 1, 5)
    assert sorted(order.tolist()) == list(range(10))
    assert torch.equal(data.epoch_order(10, 3, 1), data.epoch_order(10, 3, 1))


def test_an_unreadable_story_in_a_folder_is_one_line(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    (tmp_path / "a.txt").write_text("Satu.")
    (tmp_path / "b.txt").write_text("Dua.")
    real_read_bytes = Path.read_bytes

    def read_bytes(path):  # what a file without read permission gives (root reads any file, so it is faked)
        if path.name == "b.txt":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(UserError, match=r"cannot read .*b\.txt: Permission denied"):
        data.read_stories(tmp_path)


def test_a_folder_linked_into_the_data_folder_is_read_once_even_in_a_loop(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.txt").write_text("Isi B.", encoding="utf-8")
    stories = tmp_path / "stories"
    stories.mkdir()
    (stories / "a.txt").write_text("Isi A.", encoding="utf-8")
    (stories / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "back").symlink_to(stories, target_is_directory=True)  # a loop: stories/linked/back/linked/...
    assert data.read_stories(stories) == ["Isi A.", "Isi B."]


@pytest.mark.parametrize("count, held_out", [(25, 2), (35, 4), (15, 2), (5, 1), (2, 1)])
def test_the_held_out_count_is_rounded_to_the_nearest_halves_to_even_at_least_one_each_side(count, held_out):
    stories = [f"Cerita {n}." for n in range(count)]
    train, evaluation = data.split_stories(stories, 0.1, seed=42)
    assert (len(train), len(evaluation)) == (count - held_out, held_out)
    assert len(data.split_stories(stories[:2], 0.9, seed=42)[0]) == 1  # never all held out
