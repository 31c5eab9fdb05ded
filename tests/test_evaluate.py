"""python -m gpt2kids.evaluate: the figure equals transformers' loss averaged over every prediction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SAMPLE_TEXTS

from gpt2kids import evaluate
from gpt2kids.errors import UserError
from gpt2kids.tokenizer import Tokenizer

CPU_FP32 = ["--precision", "fp32", "--device", "cpu"]


def save_model(folder: Path, tokenizer: Tokenizer, n_positions: int = 64, seed: int = 0):
    """A small transformers GPT-2 with every parameter random (biases and LayerNorms too), saved with `tokenizer`.

    Default initialisation leaves LayerNorms at 1 and 0 and biases at 0, so a model that mixed up
    ln_1 and ln_2, or dropped a bias, would still match; here each mistake moves the loss by > 0.01.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            torch.nn.init.normal_(parameter, std=0.5)
    model.save_pretrained(folder)
    tokenizer.save(folder)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> dict[str, tuple[Path, object]]:
    """a and b share a tokenizer (b with twice the context); c has a tokenizer of its own."""
    root = tmp_path_factory.mktemp("eval-models")
    other = Tokenizer.train(SAMPLE_TEXTS, vocab_size=300)
    made = {}
    for name, tok, n_positions, seed in (("a", tokenizer, 64, 1), ("b", tokenizer, 128, 2), ("c", other, 64, 3)):
        made[name] = (root / name, save_model(root / name, tok, n_positions, seed))
    return made


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval-texts") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in SAMPLE_TEXTS), encoding="utf-8")
    return path


def reference_blocks(folder: Path, block_size: int) -> torch.Tensor:
    """run_clm's preparation, with transformers' own tokenizer: tokenize, concatenate, cut, drop the rest."""
    from transformers import AutoTokenizer

    ids = [token for encoded in AutoTokenizer.from_pretrained(folder)(SAMPLE_TEXTS)["input_ids"] for token in encoded]
    count = len(ids) // block_size
    return torch.tensor(ids[:count * block_size]).view(count, block_size)


@torch.no_grad()
def reference_loss(hf_model, blocks: torch.Tensor) -> float:
    """Each block's transformers loss (a mean over its T - 1 predictions) weighted by T - 1."""
    predictions = blocks.shape[1] - 1
    total = sum(hf_model(input_ids=block[None], labels=block[None]).loss.item() * predictions for block in blocks)
    return total / (len(blocks) * predictions)


def run_jsonl(capsys, *args: str) -> tuple[list[dict], str]:
    assert evaluate.main([*args, "--format", "jsonl"]) == 0
    captured = capsys.readouterr()
    return [json.loads(line) for line in captured.out.splitlines()], captured.err


# --- the figure -----------------------------------------------------------------------------------

def test_loss_is_transformers_loss_averaged_over_every_prediction(models, texts, capsys):
    (folder_a, hf_a), (folder_b, hf_b) = models["a"], models["b"]
    block_size = 32
    # --batch-size 3 leaves a short last batch.
    records, _ = run_jsonl(capsys, str(folder_a), str(folder_b), "--data", str(texts), "--block-size", "32",
                           "--batch-size", "3", *CPU_FP32)
    blocks = reference_blocks(folder_a, block_size)
    for record, hf_model in zip(records, (hf_a, hf_b), strict=True):
        # Both sides are fp32 sums of a few hundred terms of size ~8 in different orders: rounding is
        # ~1e-6; a wrong target, an end-of-text between texts or a misplaced LayerNorm moves it > 1e-2.
        assert record["loss"] == pytest.approx(reference_loss(hf_model, blocks), abs=1e-4)
        assert record["perplexity"] == pytest.approx(torch.tensor(record["loss"]).exp().item(), rel=1e-6)
        assert record["blocks"] == len(blocks) and record["tokens"] == len(blocks) * (block_size - 1)
    assert abs(records[0]["loss"] - records[1]["loss"]) > 0.1  # two different models, two figures


def test_the_package_functions_score_from_python_as_the_command_does(models, texts, capsys):
    from dataclasses import asdict

    from gpt2kids.device import choose_precision

    folder_a, _ = models["a"]
    records, _ = run_jsonl(capsys, str(folder_a), "--data", str(texts), "--block-size", "32", *CPU_FP32)
    candidates, block_size = evaluate.prepare_candidates([str(folder_a)], evaluate.read_texts(str(texts)),
                                                         str(texts), 32)
    cpu = torch.device("cpu")
    assert block_size == 32 and [candidate.label for candidate in candidates] == [str(folder_a)]
    assert asdict(evaluate.score(candidates[0], cpu, choose_precision("fp32", cpu))) == records[0]
    with pytest.raises(UserError, match="--batch-size 0 must be at least 1"):
        evaluate.score(candidates[0], cpu, choose_precision("fp32", cpu), batch_size=0)


def test_the_last_partial_block_is_dropped(models, texts, capsys, tokenizer):
    folder, _ = models["a"]
    total = len(reference_blocks(folder, 1).flatten())
    block_size = next(size for size in range(40, 64) if total % size >= size // 2)  # a long remainder
    [record], _ = run_jsonl(capsys, str(folder), "--data", str(texts), "--block-size", str(block_size), *CPU_FP32)
    assert record["blocks"] == total // block_size
    assert record["tokens"] == total // block_size * (block_size - 1)
    # The blocks are the plain concatenation (no end-of-text between texts), cut from the start.
    blocks = evaluate.make_blocks(SAMPLE_TEXTS, tokenizer, block_size)
    assert torch.equal(blocks, reference_blocks(folder, block_size))


def test_transformers5_trainer_evaluate_divides_by_t_not_t_minus_1(models, texts, capsys):
    """transformers 5's Trainer.evaluate gives our figure x (T - 1) / T on full blocks.

    The Trainer is not run here; what it does is reproduced with the model's own loss. For GPT-2 (no
    `loss_type`) it passes `num_items_in_batch = labels.ne(-100).sum()`, counting all T labels of a
    block though the model shifts them and makes T - 1 predictions; the model divides the batch's
    summed cross-entropy by that; evaluation_loop then averages the batch losses weighted by batch size.
    """
    folder, hf_model = models["a"]
    block_size, batch_size = 32, 3
    [record], _ = run_jsonl(capsys, str(folder), "--data", str(texts), "--block-size", str(block_size), *CPU_FP32)
    blocks = reference_blocks(folder, block_size)
    with torch.no_grad():
        weighted = 0.0
        for batch in blocks.split(batch_size):
            loss = hf_model(input_ids=batch, labels=batch, num_items_in_batch=batch.ne(-100).sum()).loss
            weighted += loss.item() * len(batch)
    trainer_figure = weighted / len(blocks)
    assert record["loss"] == pytest.approx(trainer_figure * block_size / (block_size - 1), abs=1e-4)
    assert record["loss"] - trainer_figure > 0.1  # at T = 32 the two differ by loss / 31


# --- several models -------------------------------------------------------------------------------

def test_models_sharing_a_tokenizer_share_blocks_and_one_table(models, texts, capsys):
    (folder_a, _), (folder_b, _) = models["a"], models["b"]
    # No --block-size: min(1024, the smallest context) = 64 for both, though b's context is 128. b is
    # listed first, so the first model's context would not do.
    records, err = run_jsonl(capsys, str(folder_b), str(folder_a), "--data", str(texts), *CPU_FP32)
    expected_blocks = len(reference_blocks(folder_a, 64))
    assert [r["model"] for r in records] == [str(folder_b), str(folder_a)]
    assert [r["blocks"] for r in records] == [expected_blocks] * 2
    assert [r["tokens"] for r in records] == [expected_blocks * 63] * 2
    assert "tokenizers differ" not in err
    assert "note: every model is scored on blocks of 64 tokens, the smallest context among them" in err  # b's is 128
    _, err = run_jsonl(capsys, str(folder_b), str(folder_a), "--data", str(texts), "--block-size", "64", *CPU_FP32)
    assert "blocks of 64 tokens" in err and "smallest context" not in err  # asked for: no note

    assert evaluate.main([str(folder_b), str(folder_a), "--data", str(texts), *CPU_FP32]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["model", "loss", "perplexity", "tokens", "blocks"]
    assert len(rows) == 2
    for row, record in zip(rows, records, strict=True):
        assert row.split() == [record["model"], f"{record['loss']:.4f}", f"{record['perplexity']:.2f}",
                               f"{record['tokens']:,}", f"{record['blocks']:,}"]
    assert len({row.index(f"{records[0]['blocks']:,}") for row in rows}) == 1  # columns aligned


def test_a_model_with_another_tokenizer_gets_its_own_blocks_and_a_note(models, texts, capsys):
    (folder_a, _), (folder_c, hf_c) = models["a"], models["c"]
    records, err = run_jsonl(capsys, str(folder_a), str(folder_c), "--data", str(texts), "--block-size", "32",
                             *CPU_FP32)
    assert "tokenizers differ" in err
    blocks_c = reference_blocks(folder_c, 32)
    assert records[1]["blocks"] == len(blocks_c) != records[0]["blocks"]
    assert records[1]["loss"] == pytest.approx(reference_loss(hf_c, blocks_c), abs=1e-4)  # as in the test above

    assert evaluate.main([str(folder_a), str(folder_c), "--data", str(texts), "--block-size", "32", *CPU_FP32]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and "tokenizers differ" in lines[3]


def test_a_tokenizer_saved_again_by_transformers_gives_the_same_tokens_and_no_note(models, texts, tmp_path, capsys):
    from transformers import AutoTokenizer

    folder_a, hf_a = models["a"]
    resaved = tmp_path / "resaved"
    hf_a.save_pretrained(resaved)
    AutoTokenizer.from_pretrained(folder_a).save_pretrained(resaved)
    # Serialized differently (transformers writes some unset fields its own way), yet the same tokens.
    assert Tokenizer.from_path(resaved).backend.to_str() != Tokenizer.from_path(folder_a).backend.to_str()
    records, err = run_jsonl(capsys, str(folder_a), str(resaved), "--data", str(texts), *CPU_FP32)
    assert "tokenizers differ" not in err
    assert records[0]["loss"] == records[1]["loss"] and records[0]["blocks"] == records[1]["blocks"]


def test_a_run_folder_is_scored_through_its_best_export_and_says_so(models, texts, tmp_path, capsys):
    _, hf_a = models["a"]
    _, hf_b = models["b"]
    run = tmp_path / "run"
    for export, hf_model in (("best", hf_a), ("final", hf_b)):
        hf_model.save_pretrained(run / export)
        Tokenizer.from_path(models["a"][0]).save(run / export)
    [from_run], _ = run_jsonl(capsys, str(run), "--data", str(texts), *CPU_FP32)
    [from_best], _ = run_jsonl(capsys, str(run / "best"), "--data", str(texts), *CPU_FP32)
    assert from_run["model"] == f"{run} (best/)"  # what push uploads from a run folder, too
    assert from_run["loss"] == from_best["loss"]


def test_a_non_finite_loss_is_null_in_jsonl_with_a_warning(models, texts, tmp_path, capsys):
    folder_a, hf_a = models["a"]
    broken = tmp_path / "broken"
    hf_a.save_pretrained(broken)
    Tokenizer.from_path(folder_a).save(broken)
    from safetensors.torch import load_file, save_file

    weights = load_file(broken / "model.safetensors")
    weights["transformer.ln_f.bias"][0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    assert evaluate.main([str(broken), "--data", str(texts), "--format", "jsonl", *CPU_FP32]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert record["loss"] is None and record["perplexity"] is None and record["blocks"] > 0
    assert "loss of" in captured.err and "is not finite" in captured.err


# --- precision ------------------------------------------------------------------------------------

def test_bf16_lands_near_fp32(models, texts, capsys):
    folder, _ = models["a"]
    common = [str(folder), "--data", str(texts), "--block-size", "32", "--device", "cpu"]
    [fp32], _ = run_jsonl(capsys, *common, "--precision", "fp32")
    [bf16], _ = run_jsonl(capsys, *common, "--precision", "bf16")
    # bf16 autocast rounds every matmul input to 8 significant bits (relative error up to 2^-9). This
    # model's logits are a few units in size, so a token's log-probability moves by ~1e-2 at most and
    # the mean over ~800 predictions averages most of that out; 2e-2 bounds it, while dropping a block
    # or shifting a target moves the loss by more. Unequal: autocast really ran.
    assert bf16["loss"] == pytest.approx(fp32["loss"], abs=2e-2)
    assert bf16["loss"] != fp32["loss"]
    assert bf16["tokens"] == fp32["tokens"]


# --- bad input ------------------------------------------------------------------------------------

def run_evaluate(*args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gpt2kids.evaluate", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["missing data", "too short", "block above context", "block of 0", "block of 1",
                                  "batch of 0", "tokenizer of another model", "no such folder", "hub id offline"])
def test_bad_input_is_one_line_and_exit_2(case, models, texts, tmp_path):
    folder = str(models["a"][0])
    short = tmp_path / "short.txt"
    short.write_text("Halo.", encoding="utf-8")
    mismatched = tmp_path / "mismatched"  # c's 300 embeddings with a's tokenizer of 400 ids
    if case == "tokenizer of another model":
        models["c"][1].save_pretrained(mismatched)
        Tokenizer.from_path(folder).save(mismatched)
    args, expected = {
        "missing data": ([folder, "--data", str(tmp_path / "nope.jsonl")], "does not exist"),
        "too short": ([folder, "--data", str(short)], "not one block"),
        "block above context": ([folder, "--data", str(texts), "--block-size", "65"], "exceeds the context"),
        "block of 0": ([folder, "--data", str(texts), "--block-size", "0"], "too small"),
        # One token per block makes no prediction: the mean would divide by 0.
        "block of 1": ([folder, "--data", str(texts), "--block-size", "1"], "too small"),
        "batch of 0": ([folder, "--data", str(texts), "--batch-size", "0"], "must be at least 1"),
        "tokenizer of another model": ([str(mismatched), "--data", str(texts)], "does not belong to its model"),
        "no such folder": ([str(tmp_path / "no-model"), "--data", str(texts)], "does not exist"),
        "hub id offline": (["nobody/no-such-model", "--data", str(texts)], "offline"),
    }[case]
    result = run_evaluate(*args, "--device", "cpu")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and expected in line, line


def test_a_run_folder_as_data_means_the_stories_it_held_out(tmp_path, init_folder, corpus, capsys):
    from conftest import config_for

    from gpt2kids import data
    from gpt2kids.training import train

    run = tmp_path / "run"
    train(config_for(init_folder, corpus, run, max_steps=1))
    _, held_out = data.load_split(corpus, None, 0.1, seed=3)
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps({"text": story}) + "\n" for story in held_out))
    from_run, _ = run_jsonl(capsys, str(run / "final"), "--data", str(run), "--block-size", "32")
    from_file, _ = run_jsonl(capsys, str(run / "final"), "--data", str(tmp_path / "held_out.jsonl"),
                             "--block-size", "32")
    assert from_run == from_file and from_run[0]["blocks"] > 0
