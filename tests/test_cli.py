"""What the command lines share (gpt2kids.cli): the flags given, whatever their values."""

from __future__ import annotations

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

