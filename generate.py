"""Continue prompts with a GPT-2 model: the command line. It parses flags and calls gpt2kids."""

from __future__ import annotations

import signal

# Ctrl-C while torch imports (a second or so) ends the process quietly, not in a traceback; run_cli then
# puts Python's KeyboardInterrupt back. (A SIGINT the shell ignores, as for a background job, stays ignored.)
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import fields

from gpt2kids.cli import ArgumentParser, flags_given, run_cli
from gpt2kids.decoding_kernels import check_inference_precision
from gpt2kids.device import PRECISIONS, resolve_device
from gpt2kids.errors import UserError, warn
from gpt2kids.hf import resolve
from gpt2kids.logits_processors import SamplingSettings
from gpt2kids.text_generation import (
    HUB_DEFAULT,
    StoryGenerator,
    check_prompt_text,
    check_seed,
    choose_model,
    read_prompts_file,
)

EXAMPLES = """examples:
  python generate.py "Archie sedang mengendarai roket ke planet Mars."
  python generate.py "Pada suatu hari, Kancil" --max-new-tokens 80 --top-k 50 --seed 1
  python generate.py "" "Budi suka" --num-return-sequences 2 --format jsonl
  python generate.py --prompts-file prompts.txt --format jsonl > stories.jsonl
  python generate.py --interactive --model runs/my-run
  python generate.py -- "-Halo, kata si Kancil."       (a prompt that starts with a dash)
"""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python generate.py", description="Continue prompts with a GPT-2 model. Only "
                            "generated text goes to stdout; the model used, warnings and timings go to stderr.",
                            epilog=EXAMPLES)
    add = parser.add_argument
    add("prompts", nargs="*", metavar="PROMPT",
        help='text to continue ("" starts a new story); with --serve, the prompt the page starts with')
    add("--model", metavar="SPEC", default=None,
        help=f"run folder, export folder, HF GPT-2 folder or hub id (default: the newest export under runs/, "
             f"else {HUB_DEFAULT})")
    sampling = SamplingSettings()  # the defaults are the sampler's own
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
    add("--seed", type=int, default=None, metavar="N", help="same seed, same text")
    add("--format", choices=("text", "jsonl"), default="text",
        help="text streams each sequence; jsonl prints {prompt, completion, text, new_tokens} per sequence")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add("--precision", default="auto", choices=PRECISIONS,
        help="the weights' dtype; auto picks the one that decodes fastest here, by measurement")
    add("--compile", action="store_true",
        help="torch.compile the decode step: a minute or so when the model loads, then faster tokens "
             "(for --serve, --interactive, long prompt files)")
    add("--prompts-file", metavar="PATH", help='prompts, one per line, or a .jsonl with a "prompt" field; '
                                               '- reads standard input; adds to any PROMPT arguments')
    add("--interactive", action="store_true", help="a prompt loop; a blank line or Ctrl-D ends it")
    add("--serve", action="store_true", help='a local web page to try the model (pip install -e ".[demo]")')
    add("--host", default="127.0.0.1", help="with --serve: the address to listen on")
    add("--port", type=int, default=7860, help="with --serve: the port to listen on")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Prompts may come before or after the flags; everything after `--` is a prompt, even "-Halo".
    `args.given`: the flags given, whatever their values."""
    argv = list(argv)
    after = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_intermixed_args(argv[:after])
    args.given = flags_given(parser, argv[:after])
    args.prompts += argv[after + 1:]
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    settings = SamplingSettings(**{field.name: getattr(args, field.name) for field in fields(SamplingSettings)})
    settings.validate()
    check_seed(args.seed)  # before the model loads
    prompts = list(args.prompts)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    check_prompt_text(prompts)  # before anything is loaded or printed
    if not args.serve and {"host", "port"} & args.given:
        raise UserError("--host and --port only apply with --serve")
    ignored = [f"--{name.replace('_', '-')}" for name in ("temperature", "top_k", "top_p") if name in args.given]
    if args.greedy and args.num_return_sequences > 1:  # as transformers refuses it
        raise UserError("--greedy gives one story per prompt, the same every time: drop --num-return-sequences")
    if args.greedy and ignored:  # argmax would drop them silently
        raise UserError(f"--greedy takes the most likely token, so {', '.join(ignored)} would do nothing: drop "
                        f"{'it' if len(ignored) == 1 else 'them'}, or drop --greedy to sample")
    if args.interactive and (prompts or args.prompts_file or args.serve):
        raise UserError("--interactive reads its prompts from standard input, one per line: drop the PROMPT "
                        "arguments, --prompts-file and --serve")
    if args.serve:
        if len(prompts) > 1 or args.num_return_sequences != 1 or args.format != "text":
            raise UserError("--serve shows one story at a time on its page: give at most one PROMPT (the page's "
                            "first prompt), and no --num-return-sequences or --format")
        from gpt2kids.serve import check_address, require_gradio

        require_gradio()  # before the model loads, so that a missing extra is the only line
        check_address(args.host, args.port)  # and a port that is taken, or out of range
    elif not prompts and args.prompts_file:
        raise UserError(f"--prompts-file {args.prompts_file} holds no prompts (blank lines are skipped); write one "
                        "prompt per line, or a .jsonl with a \"prompt\" field")
    elif not prompts and not args.interactive:
        raise UserError('give a PROMPT to continue ("" starts a new story), --prompts-file, --interactive, or '
                        "--serve for a web page (see python generate.py --help)")

    # A bad --device or --precision is the only line on stderr, before the model is named and loaded.
    check_inference_precision(args.precision, resolve_device(args.device))
    spec, why = choose_model(args.model)
    folder = resolve(spec)  # a hub id is fetched (or found in the cache) once, here
    print(f"model: {folder}: {why}", file=sys.stderr)  # first: the kernel choice may print a line too
    generator = StoryGenerator.load(folder, args.device, args.precision, args.compile)
    print(f"loaded on {generator.description}", file=sys.stderr)
    if settings.max_new_tokens > generator.model.config.n_positions:  # a one-token prompt and N new take N positions
        warn(f"--max-new-tokens {settings.max_new_tokens} does not fit the context of "
             f"{generator.model.config.n_positions}; prompts are kept and generation stops when the context is full")
    if args.serve:
        from gpt2kids.serve import WIDGET_PROMPT, serve

        serve(generator, args.host, args.port, model_name=spec,
              prompt=prompts[0] if prompts else WIDGET_PROMPT, defaults=settings, seed=args.seed)
    elif args.interactive:
        generator.interact(settings, args.format, args.seed)
    else:
        start = time.perf_counter()
        produced = generator.write_stories(prompts, settings, args.format, args.seed)  # Ctrl-C: see run_cli
        elapsed = time.perf_counter() - start
        print(f"{produced} new tokens in {elapsed:.2f} s ({produced / max(elapsed, 1e-9):.1f} tokens/s)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
