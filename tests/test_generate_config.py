"""generate.py's settings and their checks (gpt2kids.generate_config), made before anything is read or loaded.

The same refusals reach a user as one line and exit status 2: test_generate.py runs a few through the command."""

from __future__ import annotations

import dataclasses

import pytest

from gpt2kids.errors import UserError
from gpt2kids.generate_config import GenerateConfig, build_parser, parse_args
from gpt2kids.logits_processors import SamplingSettings


def test_no_flags_give_the_defaults_of_the_settings():
    config = parse_args(["Halo"])
    assert dataclasses.replace(config, given=None) == GenerateConfig(prompts=["Halo"])
    assert config.given == {"prompts"}
    help_text = build_parser().format_help()
    assert "(default: 50)" in help_text and "(default: 100)" in help_text  # top-k and max-new-tokens


def test_prompts_come_before_after_and_between_the_flags_and_after_a_double_dash():
    config = parse_args(["Satu", "--seed", "1", "Dua", "--greedy", "--", "-Halo", "--top-k"])
    assert config.prompts == ["Satu", "Dua", "-Halo", "--top-k"]
    assert config.seed == 1 and config.sampling.greedy and config.sampling.top_k == 50


@pytest.mark.parametrize("flags, words", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--temperature", "0"], "pass --greedy"),
    (["--seed", "-1"], "--seed must be a whole number"),  # torch would wrap it
    (["--seed", str(2**63)], "--seed must be a whole number"),  # torch would raise
    (["--model", ""], "--model is empty"),
    (["--prompts-file", ""], "--prompts-file is empty"),
    (["--port", "7860"], "--host and --port only apply with --serve"),  # given, at its default
    (["--host", "0.0.0.0"], "--host and --port only apply with --serve"),
    (["--greedy", "--num-return-sequences", "2"], "--greedy gives one story per prompt"),
    (["--greedy", "--top-k", "50"], "so --top-k would do nothing: drop it"),  # given, at its default
    (["--greedy", "--temperature=1"], "so --temperature would do nothing"),
    (["--greedy", "--temperature", "0", "--top-p", "0.9"], "so --temperature, --top-p would do nothing: drop them"),
    (["--interactive"], "--interactive reads its prompts from standard input"),  # with the PROMPT below
    (["--serve", "Dua"], "give at most one PROMPT"),
    (["--serve", "--format", "jsonl"], "no --prompts-file, --num-return-sequences or --format"),
    (["--serve", "--prompts-file", "prompts.txt"], "no --prompts-file"),
])
def test_settings_that_cannot_run_are_refused_naming_what_to_change(flags, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_args(["Satu", *flags]).validate()


def test_without_prompts_it_says_where_prompts_can_come_from():
    with pytest.raises(UserError, match=r"give a PROMPT to continue .* --prompts-file, --interactive, or --serve"):
        parse_args([]).validate()
    for flags in (["--interactive"], ["--serve"], ["--prompts-file", "prompts.txt"], [""]):
        parse_args(flags).validate()  # each is a source of prompts ("" starts a new story)


def test_settings_built_in_code_count_what_differs_from_the_defaults_as_given():
    greedy = SamplingSettings(greedy=True)
    GenerateConfig(prompts=["Satu"], sampling=greedy).validate()  # top-k at its default is not "given"
    with pytest.raises(UserError, match="so --top-k would do nothing"):
        GenerateConfig(prompts=["Satu"], sampling=dataclasses.replace(greedy, top_k=10)).validate()
    with pytest.raises(UserError, match="--host and --port only apply with --serve"):
        GenerateConfig(prompts=["Satu"], port=8000).validate()
    GenerateConfig(serve=True, port=8000).validate()
