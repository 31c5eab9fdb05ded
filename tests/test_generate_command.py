"""What generate.py does with its settings (gpt2kids.generate_command): the model it picks, how it reads prompts.

The modes themselves (stories on stdout, --interactive, --serve) run end to end in test_generate.py and
test_serve.py."""

from __future__ import annotations

import io
import os

import pytest

from gpt2kids.errors import UserError
from gpt2kids.generate_command import choose_model, read_prompts_file, run
from gpt2kids.generate_config import HUB_DEFAULT, GenerateConfig, parse_args


def test_newest_export_is_the_default(tmp_path):
    assert choose_model(None, tmp_path / "runs")[0] == HUB_DEFAULT
    for index, name in enumerate(["a/final", "b/best", "c/final"]):
        (tmp_path / "runs" / name).mkdir(parents=True)
        config = tmp_path / "runs" / name / "config.json"
        config.write_text("{}")
        os.utime(config, (1_000_000 + index * (-1 if name == "c/final" else 1),) * 2)
    assert choose_model(None, tmp_path / "runs")[0] == str(tmp_path / "runs" / "b" / "best")
    assert choose_model("given", tmp_path / "runs") == ("given", "given by --model")
    # The newest run, through its best/ (as a run folder means), though its final/ was written after it.
    for name, mtime in (("d/best", 3_000_000), ("d/final", 3_000_001)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "config.json").write_text("{}")
        os.utime(tmp_path / "runs" / name / "config.json", (mtime, mtime))
    assert choose_model(None, tmp_path / "runs")[0] == str(tmp_path / "runs" / "d" / "best")


def test_a_prompts_file_is_read_as_the_data_reader_reads_files(tmp_path, monkeypatch):
    """A BOM (Notepad writes one) is no part of the first prompt, and .JSONL is .jsonl, in files and piped."""

    (tmp_path / "bom.txt").write_bytes("\ufeffSatu\r\nDua\r\n".encode())  # and Windows line ends, also piped
    (tmp_path / "UPPER.JSONL").write_bytes('\ufeff{"prompt": "Tiga"}\n'.encode())
    assert read_prompts_file(str(tmp_path / "bom.txt")) == ["Satu", "Dua"]
    assert read_prompts_file(str(tmp_path / "UPPER.JSONL")) == ["Tiga"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("\ufeffEmpat\r\nLima\r\n".encode())))
    assert read_prompts_file("-") == ["Empat", "Lima"]


@pytest.mark.parametrize("source", ["file", "standard input"])
def test_a_lone_carriage_return_ends_a_prompt_in_a_file_and_on_standard_input(tmp_path, monkeypatch, source):

    raw = b"Budi\rSari\r\nTiga\n"
    (tmp_path / "prompts.txt").write_bytes(raw)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(raw)))
    path = str(tmp_path / "prompts.txt") if source == "file" else "-"
    assert read_prompts_file(path) == ["Budi", "Sari", "Tiga"]


def test_a_prompts_file_without_prompts_is_refused_before_a_model_is_named(tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="holds no prompts"):
        run(parse_args(["--prompts-file", str(tmp_path / "blank.txt"), "--model", str(tmp_path / "none")]))
    assert capsys.readouterr() == ("", "")


def test_run_checks_settings_built_in_code_as_the_command_line_does(tmp_path):
    with pytest.raises(UserError, match="give a PROMPT"):
        run(GenerateConfig(model=str(tmp_path)))
