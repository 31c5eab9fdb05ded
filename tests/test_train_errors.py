"""Bad input to `python train.py`: one clear line on stderr, exit status 2, no traceback, nothing on disk changed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_train

from gpt2kids.cli import run_cli
from gpt2kids.tokenizer import Tokenizer

sys.path.insert(0, str(REPO))
import train as train_cli


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>") for p in folder.rglob("*")}


def fails_cleanly(capsys, tmp_path: Path, argv: list[str], message: str) -> str:
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: train_cli.main(argv))
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert snapshot(tmp_path) == before, "a failed run changed files on disk"
    return lines[0]


@pytest.fixture
def base(tmp_path, init_folder, corpus) -> list[str]:
    return ["--data", str(corpus), "--init", str(init_folder), "--block-size", "64", "--device", "cpu",
            "--out", str(tmp_path / "run")]


@pytest.mark.parametrize("extra, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--batch-size", "two"], "argument --batch-size: invalid int value"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--epochs", "-1"], "--epochs must be positive"),
    (["--grad-accum", "0"], "--grad-accum must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--lr", "-0.001"], "--lr must be positive"),
    (["--lr", "nan"], "--lr must be finite"),
    (["--block-size", "-4"], "--block-size must be positive"),
    (["--block-size", "1"], "give no training tokens at --block-size 1"),  # no next token within a block
    (["--max-steps", "0"], "--max-steps must be positive"),
    (["--eval-every", "0"], "--eval-every must be positive"),
    (["--save-every", "0"], "--save-every must be positive"),
    (["--early-stopping", "0"], "--early-stopping must be positive"),
    (["--vocab-size", "0"], "--vocab-size must be positive"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    (["--max-grad-norm", "inf"], "--max-grad-norm must be a finite number >= 0"),  # clipping that never clips
    (["--warmup-steps", "-2"], "--warmup-steps must be a finite number >= 0"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be a finite number >= 0"),
    (["--eval-split", "1.5"], "--eval-split must be in [0, 1)"),
    (["--eval-split", "1"], "--eval-split must be in [0, 1)"),  # nothing left to train on
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--schedule", "exponential"], "argument --schedule: invalid choice"),
    (["--precision", "fp8"], "argument --precision: invalid choice"),
    (["--block-size", "1000"], "--block-size 1000 exceeds the model's context of 128"),
    (["--block-size", "129"], "--block-size 129 exceeds the model's context of 128"),
    # From scratch: refused in one line before a BPE is trained (and its lines printed).
    (["--init", "scratch", "--model-size", "tiny", "--block-size", "512"],
     "--block-size 512 exceeds the model's context of 256"),
    (["--init", "scratch", "--model-size", "tiny", "--vocab-size", "10"], "--vocab-size 10 is too small"),
    (["--device", "tpu"], "is not"),
    (["--early-stopping", "2", "--eval-split", "0"], "--early-stopping needs held-out stories"),
    (["--private"], "--private only applies with --push-to-hub REPO_ID"),
    (["--model-size", "tiny"], "--model-size only applies with --init scratch"),  # the checkpoint's size is used
    (["--model-size", "small", "--vocab-size", "300"], "--model-size and --vocab-size only apply with --init scratch"),
    (["--seed", "-1"], "--seed must be a whole number from 0"),
    (["--seed", str(2**63)], "--seed must be a whole number from 0"),  # torch.manual_seed would overflow
    (["--data", ""], "--data is empty"),  # an unset shell variable: not the bundled stories
    (["--eval-data", ""], "--eval-data is empty"),  # not the current folder
    (["--tokenizer", ""], "--tokenizer is empty"),
    (["--out", ""], "--out is empty"),  # not a new runs/<date-time>
])
def test_bad_flags(capsys, tmp_path, base, extra, message):
    fails_cleanly(capsys, tmp_path, [*base, *extra], message)


def test_settings_at_the_edge_of_what_is_allowed_pass(tmp_path):
    """Each bound of `validate` is where the help says: 0 is a dropout, one sequence of the whole context a
    block, an explicit --eval-data the held-out set --early-stopping needs."""
    from gpt2kids.train_config import TrainConfig

    TrainConfig(dropout=0.0, eval_split=0.0, eval_data=str(tmp_path), early_stopping=1, warmup_steps=0,
                weight_decay=0.0, max_grad_norm=0.0, seed=0).validate()
    TrainConfig(init="scratch", model_size="tiny", block_size=256, seed=2**63 - 1).validate()


def test_bad_data(capsys, tmp_path, init_folder):
    def argv(data: Path) -> list[str]:
        return ["--data", str(data), "--init", str(init_folder), "--out", str(tmp_path / "run"), "--device", "cpu"]

    fails_cleanly(capsys, tmp_path, argv(tmp_path / "missing"), f"--data {tmp_path / 'missing'} does not exist")
    fails_cleanly(capsys, tmp_path, argv(Path(os.devnull)), f"--data {os.devnull} is not a file or a folder")
    (tmp_path / "stories.txt").write_text("Satu.\n\nDua.\n")
    fails_cleanly(capsys, tmp_path, [*argv(tmp_path / "stories.txt"), "--eval-data", str(tmp_path / "missing")],
                  f"--eval-data {tmp_path / 'missing'} does not exist")  # named as the flag it came from
    (tmp_path / "stories.txt").unlink()
    (tmp_path / "empty").mkdir()
    fails_cleanly(capsys, tmp_path, argv(tmp_path / "empty"), "holds no stories")
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "a.bin").write_bytes(bytes(range(256)))
    fails_cleanly(capsys, tmp_path, argv(tmp_path / "binary"), "holds no stories")
    (tmp_path / "broken.jsonl").write_text('{"text": "Satu."}\n{"text": "Dua.}\n')
    fails_cleanly(capsys, tmp_path, argv(tmp_path / "broken.jsonl"), "broken.jsonl line 2 is not valid JSON")
    (tmp_path / "untitled.jsonl").write_text('{"text": "Satu."}\n{"body": "Dua."}\n')
    fails_cleanly(capsys, tmp_path, argv(tmp_path / "untitled.jsonl"), 'untitled.jsonl line 2 has no "text"')
    (tmp_path / "one.txt").write_text("Hanya satu cerita.\n")
    fails_cleanly(capsys, tmp_path, argv(tmp_path / "one.txt"), "at least 2 are needed")


def test_bad_init_and_tokenizer(capsys, tmp_path, base, corpus):
    fails_cleanly(capsys, tmp_path, [*base, "--init", str(tmp_path / "nowhere")], "does not exist")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "bert" / "model.safetensors").write_bytes(b"")
    fails_cleanly(capsys, tmp_path, [*base, "--init", str(tmp_path / "bert")], "GPT-2 models only")
    big = Tokenizer.train([p.read_text() for p in corpus.glob("*.txt")], vocab_size=2000)
    big.save(tmp_path / "big-tokenizer")
    fails_cleanly(capsys, tmp_path, [*base, "--tokenizer", str(tmp_path / "big-tokenizer")],
                  "the tokenizer has 2000 tokens but the model's embedding has only")


def test_out_already_holding_a_run_is_not_overwritten(capsys, tmp_path, base):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text("{}")
    fails_cleanly(capsys, tmp_path, base, "already holds a run; pass --resume")


@pytest.mark.parametrize("name", ["best", "final", "checkpoint-damaged"])
def test_out_holding_a_folder_of_a_name_the_run_writes_is_not_overwritten(capsys, tmp_path, base, name):
    (tmp_path / "run" / name).mkdir(parents=True)
    (tmp_path / "run" / name / "thesis.txt").write_text("mine")  # not a run's: no train_config.json beside it
    fails_cleanly(capsys, tmp_path, base, f"run holds {name}/ but no run (no train_config.json)")
    assert (tmp_path / "run" / name / "thesis.txt").read_text() == "mine"


def test_resume_with_nothing_to_resume(capsys, tmp_path, base):
    without_out = base[:base.index("--out")]
    fails_cleanly(capsys, tmp_path, [*without_out, "--resume"], "--resume needs --out RUN_FOLDER, the run to continue")
    fails_cleanly(capsys, tmp_path, [*base, "--resume"], "nothing to resume")
    (tmp_path / "run").mkdir()
    fails_cleanly(capsys, tmp_path, [*base, "--resume"], "nothing to resume")


def test_unwritable_out(capsys, tmp_path, base):
    (tmp_path / "a-file").write_text("not a folder")
    fails_cleanly(capsys, tmp_path, [*base, "--out", str(tmp_path / "a-file" / "run")], "is a file, not a folder")


def test_the_real_command_line_prints_one_line_and_no_traceback(tmp_path):
    result = run_train("--batch-size", "-3", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr == "error: --batch-size must be positive, got -3\n"
    assert not (tmp_path / "run").exists()


def test_a_bad_flag_says_where_to_look(capsys, tmp_path, base):
    line = fails_cleanly(capsys, tmp_path, [*base, "--bogus"], "unrecognized arguments: --bogus")
    assert line.endswith("(see python train.py --help)"), line


def test_run_cli_exits_with_the_status_main_returns(capsys):
    for returned, status in ((None, 0), (0, 0), (3, 3)):
        with pytest.raises(SystemExit) as stop:
            run_cli(lambda returned=returned: returned)
        assert stop.value.code == status
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("device, gpus, message", [
    ("cuda", 0, "asked for CUDA but no CUDA GPU is available; use --device cpu"),
    ("cuda:3", 2, "--device cuda:3: there are only 2 CUDA devices"),
])
def test_cuda_that_is_not_there(capsys, tmp_path, base, monkeypatch, device, gpus, message):
    """The GPUs are faked, so this holds on machines with and without one."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    fails_cleanly(capsys, tmp_path, [*base, "--device", device], message)


def test_cuda_that_is_not_there_under_torchrun(capsys, tmp_path, base, monkeypatch):
    """What torchrun sets for each process; the refusal comes before any process group or GPU is touched."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0").items():
        monkeypatch.setenv(name, value)
    fails_cleanly(capsys, tmp_path, [*base, "--device", "cuda"], "asked for CUDA but no CUDA GPU is available")


def test_more_processes_than_gpus_under_torchrun(capsys, tmp_path, base, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    fails_cleanly(capsys, tmp_path, [*base, "--device", "cuda"],
                  "torchrun started 2 processes on this machine but it has 1 GPU(s); pass --nproc_per_node=1")


def test_under_torchrun_only_rank_0_prints_errors_and_warnings(capsys, monkeypatch):
    """Every process reads the same inputs: the others' copies of rank 0's lines came out interleaved."""
    from gpt2kids.errors import UserError, warn

    def fails() -> int:
        warn("something")
        raise UserError("bad input")

    for rank, expected in (("1", ""), ("0", "warning: something\nerror: bad input\n")):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as stop:
            run_cli(fails)
        assert stop.value.code == 2 and capsys.readouterr().err == expected


def test_a_collective_whose_peer_has_stopped_is_one_line(monkeypatch):
    """Rank 0 refusing its inputs alone (a run folder that is a file) left rank 1 a traceback at the barrier."""
    import torch.distributed

    from gpt2kids.distributed import Distributed
    from gpt2kids.errors import UserError

    def closed() -> None:
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234")

    monkeypatch.setattr(torch.distributed, "barrier", closed)
    with pytest.raises(UserError, match=r"another process of this torchrun run stopped \(.*Connection closed by peer"):
        Distributed(rank=1, local_rank=1, world_size=2).barrier()
