"""What the command lines share (gpt2kids.cli): the flags given, whatever their values."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from gpt2kids.cli import ArgumentParser, flags_given


def parser() -> ArgumentParser:
    parser = ArgumentParser(prog="test")
    parser.add_argument("prompts", nargs="*")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--name", default=None)
    return parser


def test_flags_given_include_those_given_at_their_default_and_no_others():
    assert flags_given(parser(), ["--top-k", "50", "a prompt"]) == {"top_k", "prompts"}
    assert flags_given(parser(), ["--top-k=7", "--greedy"]) == {"top_k", "greedy"}
    assert flags_given(parser(), ["--greedy", "one", "--name", "x", "two"]) == {"greedy", "name", "prompts"}
    assert flags_given(parser(), []) == frozenset()


@pytest.mark.parametrize("command", [["generate.py"], ["train.py"], ["-m", "gpt2kids.evaluate"],
                                     ["-m", "gpt2kids.push"], ["-m", "gpt2kids.convert"]])
def test_ctrl_c_while_a_command_imports_torch_ends_it_without_a_traceback(command):
    process = subprocess.Popen([sys.executable, *command, "--help"], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text() and process.poll() is None:  # torch's import has begun
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr, stderr
    assert process.returncode in (-signal.SIGINT, 130, 0), stderr  # 0: --help was printed before the signal
