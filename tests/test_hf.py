"""Reading every checkpoint form DESIGN.md lists, writing HF folders, and refusing bad input."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, hf_model
from safetensors.torch import load_file, save_file

from gpt2kids.errors import UserError
from gpt2kids.hf import export, load_model, to_hf_state_dict
from gpt2kids.model import GPT2

CONFIG = dict(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4)


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture
def reference():
    return hf_model(**CONFIG)


@pytest.fixture
def input_ids():
    return torch.randint(0, CONFIG["vocab_size"], (2, 24))


def write_config(folder: pathlib.Path, model) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(folder / "config.json")


def assert_loads_like(folder, reference, input_ids) -> None:
    ours, _ = load_model(folder)
    torch.testing.assert_close(logits_of(ours.eval(), input_ids), logits_of(reference, input_ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wrapped", [False, True], ids=["state dict", "under a state_dict key"])
def test_pytorch_model_bin(tmp_path, reference, input_ids, wrapped):
    write_config(tmp_path, reference)
    state = reference.state_dict()
    torch.save({"state_dict": state} if wrapped else state, tmp_path / "pytorch_model.bin")
    assert_loads_like(tmp_path, reference, input_ids)


def test_keys_without_transformer_prefix_and_with_stale_attention_buffers(tmp_path, reference, input_ids):
    """The original OpenAI-style upload: no `transformer.` prefix, causal-mask buffers, no lm_head."""
    write_config(tmp_path, reference)
    state = {}
    for key, tensor in reference.state_dict().items():
        if key == "lm_head.weight":
            continue
        state[key.removeprefix("transformer.")] = tensor
    for layer in range(CONFIG["n_layer"]):
        state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_loads_like(tmp_path, reference, input_ids)


def test_a_config_using_hfs_other_names_for_the_sizes(tmp_path, reference, input_ids):
    """GPT2Config's attribute_map: num_attention_heads for n_head, and so on. The head count shows in no
    weight's shape, so a loader that ignored it would load the weights and compute other logits."""
    from transformers import GPT2LMHeadModel

    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for alias, name in (("hidden_size", "n_embd"), ("max_position_embeddings", "n_positions"),
                        ("num_attention_heads", "n_head"), ("num_hidden_layers", "n_layer")):
        config[alias] = config.pop(name)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert GPT2LMHeadModel.from_pretrained(tmp_path).config.n_head == CONFIG["n_head"]  # 4, where ours defaults to 12
    assert_loads_like(tmp_path, reference, input_ids)


def test_sharded_safetensors(tmp_path, reference, input_ids):
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert_loads_like(tmp_path, reference, input_ids)


@pytest.mark.skipif(not pathlib.Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("shards", [None, "20KB"], ids=["one-file", "sharded"])
def test_a_loaded_model_keeps_no_weights_file_mapped(tmp_path, reference, input_ids, shards):
    """Weights adopted from safetensors' memory map would keep the file's pages resident as long as the
    model lives (0.3 GB more peak memory when training GPT-2 Small, whose transposed weights are copies)."""
    reference.save_pretrained(tmp_path, **({"max_shard_size": shards} if shards else {}))
    ours, _ = load_model(tmp_path)
    mapped = [line for line in pathlib.Path("/proc/self/maps").read_text().splitlines() if str(tmp_path) in line]
    assert mapped == []
    torch.testing.assert_close(logits_of(ours.eval(), input_ids), logits_of(reference, input_ids), rtol=1e-5, atol=1e-5)


def test_loading_a_model_leaves_torch_dynamo_unimported(tmp_path, reference):
    """The empty model that weights load into is built on the meta device without PyTorch's meta
    `normal_`, whose first call imports torch._dynamo (over a second of every generate.py start)."""
    reference.save_pretrained(tmp_path)
    code = ("import sys, torch\n"
            "before = 'torch._dynamo' in sys.modules\n"
            "from gpt2kids.hf import load_model\n"
            f"model, _ = load_model({str(tmp_path)!r})\n"
            "assert not model.lm_head.weight.is_meta and model.lm_head.weight is model.transformer.wte.weight\n"
            "print(before, 'torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    before, after = result.stdout.split()
    if before == "True":
        pytest.skip("this torch imports torch._dynamo on import: nothing to keep from loading")
    assert after == "False"


def test_export_loads_in_transformers_with_no_missing_keys_and_same_logits(tmp_path, reference, input_ids,
                                                                           tokenizer):
    from transformers import GPT2LMHeadModel

    ours = GPT2(load_model(_saved(reference, tmp_path / "src"))[0].config)  # fresh random weights
    ours.eval()
    export(ours, tokenizer, tmp_path / "export")
    names = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(names)
    theirs, info = GPT2LMHeadModel.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(logits_of(theirs.eval(), input_ids), logits_of(ours, input_ids),
                               rtol=1e-5, atol=1e-5)
    assert "lm_head.weight" not in to_hf_state_dict(ours)


def test_an_export_names_the_tokenizers_end_id_and_the_models_context(tmp_path, tokenizer):
    """transformers' generate stops at config.json's (generation_config.json's) eos_token_id: it must be the
    token the tokenizer ended every training story with, whatever the model's config said."""
    from gpt2kids.config import GPT2Config

    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=5, eos_token_id=5)
    assert tokenizer.eos_id != 5
    export(GPT2(config), tokenizer, tmp_path / "export")
    saved = {name: json.loads((tmp_path / "export" / f"{name}.json").read_text())
             for name in ("config", "generation_config", "tokenizer_config")}
    assert saved["config"]["eos_token_id"] == saved["generation_config"]["eos_token_id"] == tokenizer.eos_id
    assert saved["tokenizer_config"]["model_max_length"] == 64  # the context, not GPT-2's 1024


def test_the_models_end_ids_are_generation_configs_else_config_jsons(tmp_path):
    from gpt2kids.hf import model_eos_ids

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "eos_token_id": 5}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 6}))
    assert model_eos_ids(tmp_path) == [6]  # what transformers' generate stops at
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert model_eos_ids(tmp_path) == [7, 9]  # several end ids: generation stops at any of them
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    assert model_eos_ids(tmp_path) == [5]
    (tmp_path / "generation_config.json").unlink()
    assert model_eos_ids(tmp_path) == [5]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "eos_token_id": [8, 9]}))
    assert model_eos_ids(tmp_path) == [8, 9]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "eos_token_id": [True, 4]}))
    assert model_eos_ids(tmp_path) == [4]  # a JSON true is no token id
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert model_eos_ids(tmp_path) == []


def test_pipeline_runs_on_an_export(tmp_path, tokenizer):
    from transformers import pipeline

    from gpt2kids.config import GPT2Config

    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    export(GPT2(config), tokenizer, tmp_path / "export")
    generator = pipeline("text-generation", model=str(tmp_path / "export"), tokenizer=str(tmp_path / "export"))
    result = generator("Pada suatu hari", max_new_tokens=5, do_sample=False)
    assert result[0]["generated_text"].startswith("Pada suatu hari")


def test_a_full_disk_while_exporting_is_one_line_and_leaves_the_old_export(tmp_path, tokenizer, reference,
                                                                           monkeypatch):
    from safetensors import SafetensorError

    from gpt2kids import hf

    model = load_model(_saved(reference, tmp_path / "src"))[0]
    export(model, tokenizer, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()}

    def full_disk(*args, **kwargs):  # what safetensors raised on a full tmpfs (0.8), not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(hf, "save_file", full_disk)
    with pytest.raises(UserError, match="no space left on the device while writing"):
        export(model, tokenizer, tmp_path / "export")
    assert {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "src"]  # no half-built folder left


def test_export_replaces_an_old_export_whole(tmp_path, tokenizer, reference):
    model = load_model(_saved(reference, tmp_path / "src"))[0]
    export(model, tokenizer, tmp_path / "export")
    (tmp_path / "export" / "stale.txt").write_text("from an older export")
    export(model, tokenizer, tmp_path / "export")
    assert not (tmp_path / "export" / "stale.txt").exists()
    assert not list(tmp_path.glob(".export.*")) and not (tmp_path / "export.old").exists()


def _saved(model, folder: pathlib.Path) -> pathlib.Path:
    model.save_pretrained(folder)
    return folder


# --- bad input -----------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "no" / "such" / "model")


def test_folder_without_weights(tmp_path, reference):
    write_config(tmp_path, reference)
    with pytest.raises(UserError, match="holds no weights"):
        load_model(tmp_path)


def test_a_named_weights_file_loads_only_if_it_is_the_one_its_folder_loads(tmp_path, reference, input_ids):
    """Loading goes by folder: naming step-500.safetensors beside a model.safetensors loaded the latter."""
    folder = _saved(reference, tmp_path / "model")
    other = {name: tensor + 1 for name, tensor in load_file(folder / "model.safetensors").items()}
    save_file(other, folder / "step-500.safetensors")
    torch.save(other, folder / "pytorch_model.bin")
    assert_loads_like(folder / "model.safetensors", reference, input_ids)
    for named in ("step-500.safetensors", "pytorch_model.bin"):
        with pytest.raises(UserError, match=f"{named} is not the weights file gpt2kids loads .its folder's model "
                                            "is model.safetensors"):
            load_model(folder / named)
    (folder / "pytorch_model.bin").unlink()
    (folder / "model.safetensors").rename(folder / "renamed.safetensors")
    with pytest.raises(UserError, match="its folder holds no model.safetensors.*put it in a folder of its own"):
        load_model(folder / "renamed.safetensors")


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="holds no config.json"):
        load_model(tmp_path)


def test_truncated_safetensors(tmp_path, reference):
    reference.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="damaged or truncated"):
        load_model(tmp_path)


def test_a_sharded_save_missing_a_shard_names_the_shard(tmp_path, reference):
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(UserError, match=re.escape(f"shard {shard} named in model.safetensors.index.json is missing; "
                                                  "re-download the model")):
        load_model(tmp_path)


@pytest.mark.parametrize("weight_map", [["model-00001.safetensors"], {"transformer.wte.weight": 1}],
                         ids=["a list", "a number for a shard"])
def test_a_malformed_shard_index_is_one_line(tmp_path, reference, weight_map):
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError, match="not a valid shard index"):
        load_model(tmp_path)


def test_config_that_is_not_gpt2(tmp_path, reference):
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="GPT-2 models only"):
        load_model(tmp_path)


def test_weights_whose_shapes_disagree_with_config(tmp_path, reference):
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_embd"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="weights and config.json disagree"):
        load_model(tmp_path)


def test_weights_with_missing_keys(tmp_path, reference):
    write_config(tmp_path, reference)
    state = {k: v for k, v in reference.state_dict().items() if "h.1." not in k and k != "lm_head.weight"}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"missing transformer\.h\.1\."):
        load_model(tmp_path)


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_hub_id_while_offline(monkeypatch, tmp_path, switch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # tests run with it on; each case turns on its own switch
    monkeypatch.setenv(switch, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=rf"hub is offline \({switch}=1\)"):
        load_model("some-owner/some-model")


class RunsCode:
    """Unpickling this calls pathlib.Path.touch: a stand-in for arbitrary code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_bin_that_is_not_a_pickle_is_called_damaged_not_dangerous(tmp_path, reference):
    write_config(tmp_path, reference)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="cannot be read as a PyTorch weights file; it may be truncated or damaged"):
        load_model(tmp_path)


class RunsShellCode:
    """Unpickling calls os.system: a module torch's weights-only unpickler blocks by name, worded otherwise."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# What torch names: a method is pickled as getattr(class, name), so getattr is what it refuses first.
@pytest.mark.parametrize("payload, named", [(RunsCode, "getattr"), (RunsShellCode, "posix.system")])
def test_pickle_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path, reference, payload, named):
    write_config(tmp_path, reference)
    marker = tmp_path / "code-ran"
    state = dict(reference.state_dict())
    state["payload"] = payload(marker)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=rf"asks to run code when unpickled \({re.escape(named)}\), which gpt2kids"):
        load_model(tmp_path)
    assert not marker.exists()


# --- python -m gpt2kids.convert --------------------------------------------------------------------

def run_convert(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gpt2kids.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_convert_a_legacy_bin_to_a_clean_folder(tmp_path, reference, input_ids, tokenizer):
    from transformers import GPT2LMHeadModel

    source = tmp_path / "legacy"
    write_config(source, reference)
    torch.save({k.removeprefix("transformer."): v for k, v in reference.state_dict().items()},
               source / "pytorch_model.bin")
    tokenizer.save(source)
    result = run_convert(str(source / "pytorch_model.bin"), str(tmp_path / "clean"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "clean" / "model.safetensors").is_file()
    assert (tmp_path / "clean" / "tokenizer.json").is_file()
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "clean").eval()
    torch.testing.assert_close(logits_of(theirs, input_ids), logits_of(reference, input_ids))
    assert_loads_like(tmp_path / "clean", reference, input_ids)


def test_convert_keeps_the_weights_dtype_and_the_generation_settings(tmp_path, reference, tokenizer):
    """As transformers' from_pretrained + save_pretrained would: an fp16 checkpoint stays fp16 (not doubled in
    size), and the source's generation settings are not replaced by gpt2kids' defaults."""
    from gpt2kids import convert

    source = tmp_path / "fp16"
    reference.half().save_pretrained(source)
    reference.generation_config.update(do_sample=False, max_new_tokens=12, repetition_penalty=1.3)
    reference.generation_config.save_pretrained(source)
    tokenizer.save(source)
    assert convert.main([str(source), str(tmp_path / "clean")]) == 0
    clean = load_file(tmp_path / "clean" / "model.safetensors")
    assert {tensor.dtype for tensor in clean.values()} == {torch.float16}
    stored = load_file(source / "model.safetensors")
    assert all(torch.equal(clean[name], stored[name]) for name in clean)
    generation = json.loads((tmp_path / "clean" / "generation_config.json").read_text())
    assert (generation["do_sample"], generation["max_new_tokens"], generation["repetition_penalty"]) == (False, 12, 1.3)


def test_convert_bad_input_is_one_line_and_exit_2(tmp_path):
    result = run_convert(str(tmp_path / "missing"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr
    assert not (tmp_path / "out").exists()


def test_convert_with_a_bad_flag_is_one_line(tmp_path):
    result = run_convert(str(tmp_path / "model"), str(tmp_path / "out"), "--bogus")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and "--bogus" in result.stderr


def test_convert_refuses_a_file_as_its_output_folder(tmp_path, reference):
    reference.save_pretrained(tmp_path / "model")
    (tmp_path / "notes.txt").write_text("keep")
    result = run_convert(str(tmp_path / "model"), str(tmp_path / "notes.txt"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not an empty folder" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_convert_refuses_a_full_output_folder_before_it_fetches_the_model(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    # Offline (the tests' HF_HUB_OFFLINE=1), a hub id that is not cached fails to load: the output folder's
    # refusal must come first, as it would before a download.
    result = run_convert("someone/not-in-the-cache", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "already exists and is not an empty folder" in result.stderr
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("existing", [False, True], ids=["new folder", "empty folder"])
def test_convert_leaves_a_folder_named_like_the_output_plus_old_alone(tmp_path, reference, existing):
    # A user's own out.old beside out/ is not where an export swap sets the old folder aside.
    reference.save_pretrained(tmp_path / "model")
    (tmp_path / "out.old").mkdir()
    (tmp_path / "out.old" / "mine.txt").write_text("user data")
    if existing:
        (tmp_path / "out").mkdir()
    assert run_convert(str(tmp_path / "model"), str(tmp_path / "out")).returncode == 0
    assert (tmp_path / "out.old" / "mine.txt").read_text() == "user data"
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_run_folder_resolves_to_its_best_export_else_final(tmp_path, reference):
    from gpt2kids.hf import resolve
    from gpt2kids.push import export_folder

    run = tmp_path / "run"
    reference.save_pretrained(run / "final")
    assert resolve(run) == run / "final"
    reference.save_pretrained(run / "best")
    assert resolve(run) == run / "best"
    assert load_model(run)[1] == run / "best"
    (run / "best" / "README.md").write_text("card")  # push wants a complete export: the same one
    (run / "best" / "tokenizer.json").write_text("{}")
    assert export_folder(run) == run / "best"


def test_a_model_folder_without_a_tokenizer_says_how_to_add_one(tmp_path, reference):
    from gpt2kids.hf import load_tokenizer

    reference.save_pretrained(tmp_path / "model")
    with pytest.raises(UserError, match=r"holds no tokenizer .*; copy the model's tokenizer files into it"):
        load_tokenizer(tmp_path / "model")


def test_a_mistyped_run_folder_is_called_missing_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    from gpt2kids.hf import resolve

    (tmp_path / "runs" / "my-run").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^runs/my-rnu does not exist; pass an existing folder"):
        resolve("runs/my-rnu")
