"""`python generate.py` end to end, in a subprocess, on a small exported model."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BF16_LOGIT_TOLERANCE, REPO, SAMPLE_TEXTS

from gpt2kids.generate_config import HUB_DEFAULT
from gpt2kids.text_output import TextStream
from gpt2kids.tokenizer import Tokenizer


def run(*args: str, cwd: Path = REPO, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """generate.py offline, started from `cwd` (another folder: as a user would from their project)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", **env}
    return subprocess.run([sys.executable, str(REPO / "generate.py"), *args], cwd=cwd, env=environment, input=stdin,
                          capture_output=True, text=True, encoding="utf-8", errors="surrogateescape", timeout=120)


def jsonl(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.split("\n") if line]  # JSON Lines end at "\n" only


def test_jsonl_records_and_seed_repeats(model_folder):
    args = ["Kancil melompat", "Budi suka", "--model", str(model_folder), "--format", "jsonl",
            "--max-new-tokens", "12", "--num-return-sequences", "2", "--seed", "3", "--precision", "fp32"]
    first = run(*args)
    records = jsonl(first)
    assert len(records) == 4
    for record, prompt in zip(records, ["Kancil melompat"] * 2 + ["Budi suka"] * 2, strict=True):
        assert set(record) == {"prompt", "completion", "text", "new_tokens"}
        assert record["prompt"] == prompt
        assert record["text"] == record["prompt"] + record["completion"]
        assert 0 <= record["new_tokens"] <= 12
    assert "tokens/s" in first.stderr
    assert jsonl(run(*args)) == records  # same seed, same text
    other = jsonl(run(*args[:-3], "4", "--precision", "fp32"))
    assert [r["completion"] for r in other] != [r["completion"] for r in records]


def test_text_streams_only_generated_text(model_folder):
    common = ["Pada suatu hari", "Intan", "--model", str(model_folder), "--max-new-tokens", "15", "--seed", "9",
              "--num-return-sequences", "2", "--top-k", "0", "--top-p", "0.95", "--temperature", "0.9"]
    text = run(*common)
    assert text.returncode == 0, text.stderr
    records = jsonl(run(*common, "--format", "jsonl"))
    # Each sequence is its prompt and continuation, with a blank line between sequences.
    assert text.stdout == "\n\n".join(record["text"] for record in records) + "\n"
    assert text.stderr.startswith("model: ") and "tokens/s" in text.stderr


def test_greedy_and_empty_prompt(model_folder):
    args = ["", "Sari pergi", "--model", str(model_folder), "--greedy", "--format", "jsonl", "--max-new-tokens", "10"]
    records = jsonl(run(*args))
    assert records[0]["prompt"] == "" and records[0]["text"] == records[0]["completion"]
    assert jsonl(run(*args)) == records


def test_compile_decodes_the_tokens_of_the_eager_model(model_folder):
    args = ["Sari pergi", "--model", str(model_folder), "--greedy", "--format", "jsonl", "--max-new-tokens", "12",
            "--precision", "fp32"]
    compiled = run(*args, "--compile")
    assert "compiled the decode step in" in compiled.stderr
    # stderr keeps its few lines: autotuning's tables of candidates (dozens of lines when inductor's cache
    # is cold, as on a fresh machine) and inductor's deprecation warnings stay out.
    assert not [line for line in compiled.stderr.splitlines() if "AUTOTUNE" in line.upper() or "Warning" in line]
    assert jsonl(compiled) == jsonl(run(*args))


def transformers_greedy(model_folder, prompt_ids, dtype, steps):
    """transformers' greedy tokens and each step's logits (fp32 copies)."""
    from transformers import GPT2LMHeadModel

    reference = GPT2LMHeadModel.from_pretrained(model_folder, dtype=dtype).eval()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                                 pad_token_id=-1, eos_token_id=None, output_logits=True,
                                 return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.cat(out.logits).float()


def test_greedy_cli_gives_the_tokens_of_transformers_in_fp32(model_folder):
    """The whole CLI path, the decode-time weight layouts included, against transformers' generate."""
    prompt = "Pada suatu hari"
    [record] = jsonl(run(prompt, "--model", str(model_folder), "--greedy", "--format", "jsonl",
                         "--max-new-tokens", "20", "--precision", "fp32"))
    tokenizer = Tokenizer.from_path(model_folder)
    tokens, _ = transformers_greedy(model_folder, tokenizer.encode(prompt), torch.float32, 20)
    new = tokens[:tokens.index(tokenizer.eos_id)] if tokenizer.eos_id in tokens else tokens
    assert len(new) >= 10  # a real continuation, not an early end-of-text
    assert record["completion"] == tokenizer.decode(new)
    assert record["new_tokens"] == len(new)


def test_generation_stops_at_every_end_id_its_generation_config_lists(model_folder, tmp_path):
    import shutil

    folder = shutil.copytree(model_folder, tmp_path / "model")
    prompt = "Pada suatu hari"
    tokenizer = Tokenizer.from_path(folder)
    tokens, _ = transformers_greedy(folder, tokenizer.encode(prompt), torch.float32, 20)
    stop = next(i for i, token in enumerate(tokens) if i >= 1 and tokens.index(token) == i)
    settings = json.loads((folder / "generation_config.json").read_text())
    settings["eos_token_id"] = [tokenizer.eos_id, tokens[stop]]  # a second end id, at the token's first place
    (folder / "generation_config.json").write_text(json.dumps(settings))
    [record] = jsonl(run(prompt, "--model", str(folder), "--greedy", "--format", "jsonl", "--max-new-tokens", "20",
                         "--precision", "fp32"))
    assert tokenizer.eos_id not in tokens[:stop]
    assert record["new_tokens"] == stop
    assert record["completion"] == tokenizer.decode(tokens[:stop])


def test_bf16_decoding_gives_the_logits_of_transformers_and_its_tokens_where_they_are_clear(model_folder):
    """One prompt, one token a step: the one-row bf16 kernels, step by step on transformers' own tokens."""
    from gpt2kids.decode_loop import next_token_scores
    from gpt2kids.model import KVCache
    from gpt2kids.text_generation import StoryGenerator

    prompt, steps = "Pada suatu hari", 30
    generator = StoryGenerator.load(str(model_folder), "cpu", "bf16")
    model, tokenizer = generator.model, generator.tokenizer
    prompt_ids = tokenizer.encode(prompt)
    tokens, theirs = transformers_greedy(model_folder, prompt_ids, torch.bfloat16, steps)
    cache = KVCache(model.config, 1, len(prompt_ids) + steps, "cpu", torch.bfloat16)
    with torch.inference_mode():
        ours = [next_token_scores(model, torch.tensor([prompt_ids]), cache, None, None)]
        for token in tokens[:-1]:
            ours.append(next_token_scores(model, torch.tensor([[token]]), cache, None, None))
    ours = torch.cat(ours)
    scale = theirs.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)
    assert ((ours - theirs).abs() <= BF16_LOGIT_TOLERANCE * scale).all()
    # Where transformers' best token leads by more than both sides' rounding, ours is the same token.
    top2 = theirs.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * BF16_LOGIT_TOLERANCE * scale[:, 0]
    assert clear.sum() >= steps // 2  # the comparison covers most steps
    assert torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])

    # And the CLI's own bf16 decode follows transformers up to the first step that is not clear.
    [record] = jsonl(run(prompt, "--model", str(model_folder), "--greedy", "--format", "jsonl",
                         "--max-new-tokens", str(steps), "--precision", "bf16"))
    agreed = tokens[:int(clear.long().cumprod(0).sum())]
    if tokenizer.eos_id in agreed:  # generate.py stops there
        agreed = agreed[:agreed.index(tokenizer.eos_id)]
    assert len(agreed) >= 5
    assert record["completion"].startswith(tokenizer.decode(agreed))


def test_long_prompt_keeps_its_end_with_a_warning(model_folder):
    result = run("kancil dan buaya " * 40, "--model", str(model_folder), "--max-new-tokens", "10",
                 "--format", "jsonl")
    records = jsonl(result)
    assert len(records) == 1
    assert "warning: prompt 1 has" in result.stderr and "last 55" in result.stderr  # 55 + 10 - 1 = 64 positions


@pytest.mark.parametrize("new_tokens, warns", [("64", False), ("65", True)])
def test_max_new_tokens_beyond_the_context_warns(model_folder, new_tokens, warns):
    # A one-token prompt and 64 new tokens take 64 positions: the context of the test model.
    result = run("", "--model", str(model_folder), "--max-new-tokens", new_tokens, "--format", "jsonl", "--greedy")
    assert result.returncode == 0, result.stderr
    assert ("does not fit the context of 64" in result.stderr) == warns


def test_a_seeded_prompts_file_draws_on_from_one_batch_to_the_next(model_folder, tmp_path):
    # 32 copies of one prompt are decoded in two batches of 16: the second must not replay the first's draws.
    (tmp_path / "prompts.txt").write_text("Pada suatu hari\n" * 32)
    args = ["--model", str(model_folder), "--prompts-file", str(tmp_path / "prompts.txt"), "--format", "jsonl",
            "--max-new-tokens", "8", "--seed", "1", "--precision", "fp32"]
    completions = [record["completion"] for record in jsonl(run(*args))]
    assert completions[16:] != completions[:16]
    assert completions == [record["completion"] for record in jsonl(run(*args))]  # same seed, same text


def test_warnings_number_prompts_across_batches_of_a_prompts_file(model_folder, tmp_path):
    # 20 prompts are decoded in two batches; the long one is the 18th of the file.
    prompts = ["Pada suatu hari"] * 17 + ["kancil dan buaya " * 40, "Lalu", "Akhirnya"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    result = run("--model", str(model_folder), "--prompts-file", str(tmp_path / "prompts.txt"),
                 "--max-new-tokens", "10", "--format", "jsonl", "--greedy")
    assert len(jsonl(result)) == 20
    assert "warning: prompt 18 has" in result.stderr and "warning: prompt 2 has" not in result.stderr


@pytest.mark.parametrize("flags, words", [
    (["--model", "{missing}"], "does not exist"),
    (["--top-k", "ten"], "--top-k"),
    (["\udcff"], "not valid UTF-8"),
    (["--seed", str(2**64)], "--seed must be"),  # torch would raise (the other flag checks: test_generate_config.py)
    (["--device", "cuda:99"], "--device cuda:99"),  # the only line: said before the "model:" line
    (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a GPU"),
    (["--prompts-file", "{folder}"], "is a folder; pass a file of prompts"),
    (["--serve", "--format", "jsonl"], "no --prompts-file, --num-return-sequences or --format"),
    (["--greedy", "--top-k", "50"], "so --top-k would do nothing"),  # given, at its default
])
def test_bad_input_is_one_line_and_status_2(model_folder, tmp_path, flags, words):
    flags = [flag.replace("{missing}", str(tmp_path / "no-such-model")).replace("{folder}", str(tmp_path))
             for flag in flags]
    args = ["Halo", "--model", str(model_folder), *flags]
    result = run(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_model_with_nan_weights_ends_the_streamed_line_and_gives_one_error(model_folder, tmp_path):
    from gpt2kids.hf import export, load_model, load_tokenizer

    model, _ = load_model(model_folder)
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")
    export(model, load_tokenizer(model_folder), tmp_path / "broken")
    result = run("Halo", "--model", str(tmp_path / "broken"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stdout == "Halo\n"  # the prompt's line ended before the error
    assert result.stderr.splitlines()[-1].startswith("error: the model computed scores that are not finite")


def test_a_tokenizer_larger_than_the_model_is_refused_in_one_line(tmp_path, tokenizer):
    """Its ids past the model's vocabulary would index past the embedding (an IndexError mid-story)."""
    from gpt2kids.config import GPT2Config
    from gpt2kids.errors import UserError
    from gpt2kids.hf import export
    from gpt2kids.model import GPT2
    from gpt2kids.text_generation import StoryGenerator

    small = tokenizer.vocab_size - 1  # one id past the embedding is one too many
    export(GPT2(GPT2Config(vocab_size=small, n_positions=64, n_embd=32, n_layer=1, n_head=2)), tokenizer,
           tmp_path / "mismatched")
    with pytest.raises(UserError, match=f"^the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                                        f"{small}; the tokenizer and the model do not belong together$"):
        StoryGenerator.load(tmp_path / "mismatched", "cpu", "fp32")


def test_jsonl_records_count_the_new_tokens_of_each_row(tokenizer):
    from gpt2kids.text_output import write_jsonl

    completions = [tokenizer.encode(" melompat tinggi"), []]
    out = io.StringIO()
    write_jsonl(tokenizer, ["Kancil", "Budi"], completions, out)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert records == [
        {"prompt": "Kancil", "completion": " melompat tinggi", "text": "Kancil melompat tinggi",
         "new_tokens": len(completions[0])},
        {"prompt": "Budi", "completion": "", "text": "Budi", "new_tokens": 0},
    ]


def test_stream_never_prints_half_a_character():
    tokenizer = Tokenizer.train(SAMPLE_TEXTS, vocab_size=257)  # no merges: one token per byte
    ids = tokenizer.encode("Roket 🚀 terbang")
    assert len(ids) == len("Roket 🚀 terbang".encode())
    out = io.StringIO()
    stream = TextStream(tokenizer, ["A: "], out)
    for token in ids:
        stream([token])
        assert "\ufffd" not in out.getvalue()
    stream([None])
    stream.finish()
    assert out.getvalue() == "A: Roket 🚀 terbang\n"


def test_without_model_the_newest_export_under_runs_is_loaded(model_folder, tmp_path):
    import shutil

    for index, name in enumerate(["a/final", "b/best"]):
        shutil.copytree(model_folder, tmp_path / "runs" / name)
        os.utime(tmp_path / "runs" / name / "config.json", (1_000_000 + index,) * 2)
    args = ["Budi suka", "--max-new-tokens", "3", "--precision", "fp32", "--format", "jsonl"]
    for newest in ("b/best", "a/final"):  # neither "best first" nor "last by name" picks both
        os.utime(tmp_path / "runs" / newest / "config.json", (2_000_000 if newest == "a/final" else 1_500_000,) * 2)
        result = run(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        first = result.stderr.splitlines()[0]
        assert first == f"model: {Path('runs') / newest}: the newest export under runs/", result.stderr
        assert len(jsonl(result)) == 1


def test_without_model_or_runs_the_published_model_is_named(tmp_path):
    assert HUB_DEFAULT == "bookbot/gpt2-indo-small-kids-stories"
    # An empty hub cache, offline: the fallback must be asked for by name, and fail in one line.
    result = run("Halo", cwd=tmp_path, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(tmp_path / "hf-cache"))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and HUB_DEFAULT in lines[0], result.stderr
    assert lines[0].endswith("(no --model given: the published model, since runs/ holds no export (train one with "
                             "python train.py))"), lines[0]  # why a model the user never named
    assert not (tmp_path / "runs").exists()


def test_a_prompt_that_starts_with_a_dash_comes_after_double_dash(model_folder):
    [record] = jsonl(run("--model", str(model_folder), "--format", "jsonl", "--max-new-tokens", "3", "--",
                         "-Halo, kata si Kancil."))
    assert record["prompt"] == "-Halo, kata si Kancil."


def test_help_shows_defaults_and_examples():
    result = run("--help")
    assert result.returncode == 0
    assert "(default: 100)" in result.stdout and "(default: 50)" in result.stdout  # --max-new-tokens, --top-k
    assert "examples:" in result.stdout and 'python generate.py -- "-Halo' in result.stdout
    train_help = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                                timeout=60)
    assert "(default: 5e-05)" in train_help.stdout and "examples:" in train_help.stdout
    assert "(default: 0)" in " ".join(train_help.stdout.split())  # --warmup-steps: a default of 0 is shown too
    assert "from its last checkpoint (default" not in " ".join(train_help.stdout.split())  # --resume: a switch


def test_prompts_file_gives_one_record_per_prompt_in_order(model_folder, tmp_path):
    prompts = [f"Cerita nomor {number}" + " dan" * (number % 7) for number in range(1000)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    records = jsonl(run("--model", str(model_folder), "--prompts-file", str(tmp_path / "prompts.jsonl"),
                        "--format", "jsonl", "--max-new-tokens", "2", "--greedy", "--precision", "fp32"))
    assert [record["prompt"] for record in records] == prompts
    # Batching changes nothing: a prompt decoded within its batch gives what it gives alone.
    [alone] = jsonl(run(prompts[123], "--model", str(model_folder), "--format", "jsonl", "--max-new-tokens", "2",
                        "--greedy", "--precision", "fp32"))
    assert records[123] == alone


def test_prompts_from_a_text_file_and_standard_input_add_to_the_arguments(model_folder, tmp_path):
    # A form feed or a Unicode line separator inside a line does not end it: lines end at newlines only.
    (tmp_path / "prompts.txt").write_text("Satu\r\n\nDua\x0cdan\u2028tiga\n", encoding="utf-8")
    common = ["--model", str(model_folder), "--format", "jsonl", "--max-new-tokens", "2"]
    records = jsonl(run("Nol", *common, "--prompts-file", str(tmp_path / "prompts.txt")))
    assert [record["prompt"] for record in records] == ["Nol", "Satu", "Dua\x0cdan\u2028tiga"]
    piped = run(*common, "--prompts-file", "-", stdin="Tiga\nEmpat\n")
    assert [record["prompt"] for record in jsonl(piped)] == ["Tiga", "Empat"]


def test_a_prompts_file_without_prompts_says_so(model_folder, tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n")
    result = run("--model", str(model_folder), "--prompts-file", str(tmp_path / "blank.txt"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"--prompts-file {tmp_path / 'blank.txt'} holds no prompts" in result.stderr


def test_interactive_continues_each_line_with_the_model_loaded_once(model_folder):
    result = run("--interactive", "--model", str(model_folder), "--format", "jsonl", "--max-new-tokens", "3",
                 "--greedy", stdin="Satu\nDua\n\nTiga\n")
    records = jsonl(result)
    assert [record["prompt"] for record in records] == ["Satu", "Dua"]  # the empty line ended it
    assert result.stderr.count("model: ") == 1


def test_interactive_takes_lines_ending_in_crlf_and_asks_again_after_a_line_that_is_not_utf8(model_folder):
    common = ["--interactive", "--model", str(model_folder), "--format", "jsonl", "--max-new-tokens", "2", "--greedy"]
    result = subprocess.run([sys.executable, str(REPO / "generate.py"), *common], cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"},
                            input=b"Satu\r\nSat\xffu\nDua\r\n\r\n", capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.decode("utf-8").split("\n") if line]
    assert [record["prompt"] for record in records] == ["Satu", "Dua"]
    assert b"that line is not UTF-8 text" in result.stderr


def test_prompts_from_standard_input_that_are_not_utf8_are_one_line(model_folder):
    result = subprocess.run([sys.executable, str(REPO / "generate.py"), "--prompts-file", "-", "--model",
                             str(model_folder)], cwd=REPO, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
                            input=b"Sat\xffu\n", capture_output=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.decode() == ("error: standard input is not UTF-8 text (byte 3 is not); "
                                      "save the prompts as UTF-8\n")


@pytest.mark.parametrize("extra", [["Satu"], ["--serve"]])
def test_interactive_with_other_prompts_is_refused(model_folder, extra):
    result = run("--interactive", "--model", str(model_folder), *extra, stdin="Dua\n")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--interactive reads its prompts from standard input" in result.stderr


def test_offline_without_a_model_the_error_names_the_offline_demo(tmp_path):
    result = run("Halo", cwd=tmp_path, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(tmp_path / "hf-cache"))
    assert result.returncode == 2
    assert "python train.py --init scratch --model-size tiny" in result.stderr
    assert "python generate.py --model runs/demo" in result.stderr


def test_a_reader_that_stops_reading_ends_generation_quietly(model_folder):
    # `generate.py ... | head -1`: the pipe closes before the first story is written.
    process = subprocess.Popen([sys.executable, str(REPO / "generate.py"), "a", "--model", str(model_folder),
                                "--num-return-sequences", "3", "--max-new-tokens", "20"], cwd=REPO,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 141, stderr  # 128 + SIGPIPE, as `yes | head -1` gives `yes`
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


@pytest.mark.parametrize("flags, status, words", [
    (["--prompts-file", "-"], 2, "holds no prompts"),
    (["--interactive"], 0, ""),
], ids=["prompts-file", "interactive"])
def test_a_closed_standard_input_is_read_as_an_empty_one(model_folder, flags, status, words):
    # `generate.py --prompts-file - <&-`: Python has no sys.stdin at all then.
    result = subprocess.run([sys.executable, str(REPO / "generate.py"), "--model", str(model_folder), *flags],
                            cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.close(0))
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr and words in result.stderr


def test_interactive_with_a_prompts_file_is_refused_even_when_the_file_is_empty(model_folder, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = run("--model", str(model_folder), "--interactive", "--prompts-file", str(tmp_path / "empty.txt"))
    assert result.returncode == 2 and "--interactive reads its prompts from standard input" in result.stderr


def test_a_ctrl_c_the_shell_ignores_stays_ignored(model_folder):
    # A background job of a script starts with SIGINT ignored: Ctrl-C meant for the foreground leaves it alone.
    import select

    command = [sys.executable, str(REPO / "generate.py"), "--model", str(model_folder), "--interactive"]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    seen, deadline = b"", time.monotonic() + 120
    while b"> " not in seen:  # the model is loaded and the loop waits for a line
        assert time.monotonic() < deadline and process.poll() is None, seen
        if select.select([process.stderr], [], [], 1)[0]:
            seen += os.read(process.stderr.fileno(), 4096)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    _, stderr = process.communicate(b"\n", timeout=60)  # a blank line ends the loop
    assert process.returncode == 0, seen + stderr
