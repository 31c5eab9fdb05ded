"""The settings of one `python generate.py` (`GenerateConfig`), the flags that fill them, and their checks.

Everything here is decided from the flags alone, before a file is read or a model loaded, so that a wrong
command line is one line on stderr and nothing else; `gpt2kids.generate_command` then runs the settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpt2kids.cli import ArgumentParser, check_seed, flags_given
from gpt2kids.device import PRECISIONS
from gpt2kids.errors import UserError
from gpt2kids.logits_processors import SamplingSettings

HUB_DEFAULT = "bookbot/gpt2-indo-small-kids-stories"
FORMATS = ("text", "jsonl")
SAMPLING_FLAGS = tuple(setting.name for setting in dataclasses.fields(SamplingSettings))
EXAMPLES = """examples:
  python generate.py "Archie sedang mengendarai roket ke planet Mars."
  python generate.py "Pada suatu hari, Kancil" --max-new-tokens 80 --top-k 50 --seed 1
  python generate.py "" "Budi suka" --num-return-sequences 2 --format jsonl
  python generate.py --prompts-file prompts.txt --format jsonl > stories.jsonl
  python generate.py --interactive --model runs/my-run
  python generate.py -- "-Halo, kata si Kancil."       (a prompt that starts with a dash)
"""


@dataclass
class GenerateConfig:
    """What to load, which prompts, how to sample, and which mode: stories on stdout, --interactive or --serve."""

    prompts: list[str] = field(default_factory=list)  # the PROMPT arguments (--prompts-file is read when it runs)
    model: str | None = None  # None: the newest export under runs/, else the published model
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    seed: int | None = None
    format: str = "text"
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    prompts_file: str | None = None
    interactive: bool = False
    serve: bool = False
    host: str = "127.0.0.1"
    port: int = 7860
    # The flags given on the command line (argparse's names), whatever their values; None (not from a command
    # line): the settings away from their defaults count as given.
    given: frozenset[str] | None = None

    def given_flags(self) -> frozenset[str]:
        """The settings the user set: `given`, or for settings built in code those away from their defaults."""
        if self.given is not None:
            return self.given
        defaults, default_sampling = GenerateConfig(), SamplingSettings()
        return frozenset([name for name in ("host", "port") if getattr(self, name) != getattr(defaults, name)]
                         + [name for name in SAMPLING_FLAGS
                            if getattr(self.sampling, name) != getattr(default_sampling, name)])

    def validate(self) -> None:
        """Raise `UserError` for the first value or combination of flags that cannot run, saying what to change."""
        self.sampling.validate()
        check_seed(self.seed, "--seed")
        for name, what in (("model", "a run folder, an export, an HF folder or a hub id"),
                           ("prompts_file", "a file of prompts, or - for standard input")):
            if getattr(self, name) == "":  # an unset shell variable: not "the default", and not "."
                raise UserError(f"--{name.replace('_', '-')} is empty; name {what}, or leave the flag out")
        if self.format not in FORMATS:
            raise UserError(f"--format {self.format!r} is not one of {', '.join(FORMATS)}")
        given = self.given_flags()
        if not self.serve and {"host", "port"} & given:
            raise UserError("--host and --port only apply with --serve")
        if self.sampling.greedy and self.sampling.num_return_sequences > 1:  # as transformers refuses it
            raise UserError("--greedy gives one story per prompt, the same every time: drop --num-return-sequences")
        ignored = [f"--{name.replace('_', '-')}" for name in ("temperature", "top_k", "top_p") if name in given]
        if self.sampling.greedy and ignored:  # argmax would drop them silently
            raise UserError(f"--greedy takes the most likely token, so {', '.join(ignored)} would do nothing: drop "
                            f"{'it' if len(ignored) == 1 else 'them'}, or drop --greedy to sample")
        if self.interactive and (self.prompts or self.prompts_file is not None or self.serve):
            raise UserError("--interactive reads its prompts from standard input, one per line: drop the PROMPT "
                            "arguments, --prompts-file and --serve")
        if self.serve and (len(self.prompts) > 1 or self.prompts_file is not None
                           or self.sampling.num_return_sequences != 1 or self.format != "text"):
            raise UserError("--serve shows one story at a time on its page: give at most one PROMPT (the page's "
                            "first prompt), and no --prompts-file, --num-return-sequences or --format")
        if not (self.prompts or self.prompts_file is not None or self.interactive or self.serve):
            raise UserError('give a PROMPT to continue ("" starts a new story), --prompts-file, --interactive, or '
                            "--serve for a web page (see python generate.py --help)")


def build_parser() -> ArgumentParser:
    """The flags of `GenerateConfig`, with its defaults (the sampling ones are `SamplingSettings`')."""
    defaults, sampling = GenerateConfig(), SamplingSettings()
    parser = ArgumentParser(prog="python generate.py", description="Continue prompts with a GPT-2 model. Only "
                            "generated text goes to stdout; the model used, warnings and timings go to stderr.",
                            epilog=EXAMPLES)
    add = parser.add_argument
    add("prompts", nargs="*", metavar="PROMPT",
        help='text to continue ("" starts a new story); with --serve, the prompt the page starts with')
    add("--model", metavar="SPEC", default=defaults.model,
        help=f"run folder, export folder, HF GPT-2 folder or hub id (default: the newest export under runs/, "
             f"else {HUB_DEFAULT})")
    add("--max-new-tokens", type=int, default=sampling.max_new_tokens, metavar="N", help="tokens to add to each prompt")
    add("--temperature", type=float, default=sampling.temperature, metavar="X",
        help="below 1 sharper, above 1 more varied")
    add("--top-k", type=int, default=sampling.top_k, metavar="N", help="0 turns it off")
    add("--top-p", type=float, default=sampling.top_p, metavar="X", help="1 turns it off")
    add("--repetition-penalty", type=float, default=sampling.repetition_penalty, metavar="X", help="1 turns it off")
    add("--no-repeat-ngram-size", type=int, default=sampling.no_repeat_ngram_size, metavar="N", help="0 turns it off")
    add("--num-return-sequences", type=int, default=sampling.num_return_sequences, metavar="N",
        help="stories per prompt")
    add("--greedy", action="store_true", help="argmax decoding")
    add("--seed", type=int, default=defaults.seed, metavar="N",
        help="same seed, same text (default: none, a different story each time)")
    add("--format", choices=FORMATS, default=defaults.format,
        help="text streams each sequence; jsonl prints {prompt, completion, text, new_tokens} per sequence")
    add("--device", default=defaults.device, help="auto, cpu, cuda, cuda:N or mps")
    add("--precision", default=defaults.precision, choices=PRECISIONS,
        help="the weights' dtype; auto picks the one that decodes fastest here, by measurement")
    add("--compile", action="store_true",
        help="torch.compile the decode step: a minute or so when the model loads, then faster tokens "
             "(for --serve, --interactive, long prompt files)")
    add("--prompts-file", metavar="PATH", help='prompts, one per line, or a .jsonl with a "prompt" field; '
                                               '- reads standard input; adds to any PROMPT arguments')
    add("--interactive", action="store_true", help="a prompt loop; a blank line or Ctrl-D ends it")
    add("--serve", action="store_true", help='a local web page to try the model (pip install -e ".[demo]")')
    add("--host", default=defaults.host, help="with --serve: the address to listen on")
    add("--port", type=int, default=defaults.port, help="with --serve: the port to listen on")
    return parser


def parse_args(argv: Sequence[str]) -> GenerateConfig:
    """The settings `argv` asks for (`gpt2kids.generate_command.run` checks them).

    Prompts may come before or after the flags; everything after `--` is a prompt, even "-Halo".
    """
    argv = list(argv)
    after = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    values = vars(parser.parse_intermixed_args(argv[:after]))
    sampling = SamplingSettings(**{name: values.pop(name) for name in SAMPLING_FLAGS})
    config = GenerateConfig(**values, sampling=sampling, given=flags_given(parser, argv[:after]))
    config.prompts += argv[after + 1:]
    return config
