"""`python generate.py`: load a model, continue prompts, print the text.

Only generated text goes to stdout: with `--format text` each sequence (prompt, then continuation)
streams as it is decoded, with a blank line between sequences; with `--format jsonl` one JSON object
per sequence. Progress, warnings and the timing line go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch

from gpt2kids.config import GPT2Config
from gpt2kids.decoding import optimize_for_decoding
from gpt2kids.device import PRECISIONS, resolve_device, weights_dtype_for_inference
from gpt2kids.errors import ArgumentParser, UserError
from gpt2kids.hf import load_model, load_tokenizer, resolve
from gpt2kids.sampling import SamplingSettings, fit_prompt, generate
from gpt2kids.tokenizer import Tokenizer

HUB_DEFAULT = "bookbot/gpt2-indo-small-kids-stories"
REPLACEMENT = "\ufffd"  # what decoding gives for a UTF-8 character whose bytes have not all arrived


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python generate.py", description="Continue prompts with a GPT-2 model.")
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help='text to continue ("" starts a new story)')
    parser.add_argument("--model", metavar="SPEC", default=None,
                        help=f"run folder, export folder, HF GPT-2 folder or hub id (default: the newest "
                             f"export under runs/, else {HUB_DEFAULT})")
    parser.add_argument("--max-new-tokens", type=int, default=100, metavar="N")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="X")
    parser.add_argument("--top-k", type=int, default=50, metavar="N", help="0 turns it off")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="X")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="X")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N")
    parser.add_argument("--num-return-sequences", type=int, default=1, metavar="N")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding")
    parser.add_argument("--seed", type=int, default=None, metavar="N", help="same seed, same text")
    parser.add_argument("--format", choices=("text", "jsonl"), default="text")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="weights' dtype: auto (bf16 where the device does it well), fp32, bf16, fp16")
    return parser


def newest_export(runs: Path = Path("runs")) -> Path | None:
    """The `runs/*/final` or `runs/*/best` export whose config.json was written last."""
    configs = [config for pattern in ("*/final/config.json", "*/best/config.json") for config in runs.glob(pattern)]
    if not configs:
        return None
    return max(configs, key=lambda config: config.stat().st_mtime).parent


def check_prompts(prompts: Sequence[str]) -> None:
    for number, prompt in enumerate(prompts, start=1):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            # Python maps argv bytes that are not UTF-8 to lone surrogates; no tokenizer can take those.
            raise UserError(f"prompt {number} is not valid UTF-8 text; check your terminal's or shell's "
                            "encoding (a UTF-8 locale is needed)") from None


class TextStream:
    """Prints sequences in order: the current one streams, later ones wait until it is done.

    Decoding is incremental but never prints half a character: a prefix whose decoding ends in
    U+FFFD is still waiting for the rest of a multi-byte UTF-8 character.
    """

    def __init__(self, tokenizer: Tokenizer, prompts: Sequence[str], out: TextIO) -> None:
        self.tokenizer = tokenizer
        self.prompts = prompts  # one per output row
        self.out = out
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.done = [False] * len(prompts)
        self.current = 0
        self.printed = ""  # the current row's completion text printed so far
        self._start_row()

    def _start_row(self) -> None:
        if self.current > 0:
            self.out.write("\n")  # a blank line between sequences
        self.out.write(self.prompts[self.current])
        self.out.flush()

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens[self.current])
        if not final and text.endswith(REPLACEMENT):
            return
        # A prefix that decodes to whole characters stays a prefix (UTF-8 resynchronises), so
        # the check below only guards against a tokenizer that rewrites earlier text.
        if text.startswith(self.printed) or final:
            self.out.write(text[len(self.printed):])
            self.printed = text
        self.out.flush()

    def __call__(self, new: list[int | None]) -> None:
        for row, token in enumerate(new):
            if token is None:
                self.done[row] = True
            else:
                self.tokens[row].append(token)
        self._advance()

    def _advance(self) -> None:
        while self.current < len(self.prompts):
            self._emit(final=self.done[self.current])
            if not self.done[self.current]:
                return
            self.out.write("\n")
            self.out.flush()
            self.current += 1
            if self.current < len(self.prompts):
                self.printed = ""
                self._start_row()

    def finish(self) -> None:
        """Print whatever is left once generation has stopped (length limit reached)."""
        self.done = [True] * len(self.done)
        self._advance()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # prompts may come after flags too
    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
        greedy=args.greedy, num_return_sequences=args.num_return_sequences)
    settings.validate()
    check_prompts(args.prompts)

    spec = args.model
    if spec is None:
        found = newest_export()
        spec = str(found) if found is not None else HUB_DEFAULT
    device = resolve_device(args.device)
    folder = resolve(spec)  # first, so a bad --model is the only line on stderr
    # auto on CPU: the dtype a decode step of this model's shapes runs fastest in (measured once, cached)
    dtype = weights_dtype_for_inference(args.precision, device, GPT2Config.from_json_file(folder / "config.json"))
    print(f"loading {folder} on {device} ({str(dtype).removeprefix('torch.')} weights)", file=sys.stderr)
    model, folder = load_model(folder, device, dtype)
    optimize_for_decoding(model.eval())
    tokenizer = load_tokenizer(folder)
    eos_id = tokenizer.eos_id

    prompt_ids = tokenizer.encode_batch(args.prompts)
    context = model.config.n_positions
    for number, ids in enumerate(prompt_ids, start=1):
        if any(token >= model.config.vocab_size for token in [*ids, eos_id]):
            raise UserError(f"the tokenizer in {folder} gives token ids beyond the model's vocabulary of "
                            f"{model.config.vocab_size}; the tokenizer and the model do not belong together")
        fitted, cut = fit_prompt(ids, context, settings.max_new_tokens, eos_id)
        if cut:
            print(f"warning: prompt {number} has {len(ids)} tokens; with --max-new-tokens "
                  f"{settings.max_new_tokens} and a context of {context} only its last {len(fitted)} are used",
                  file=sys.stderr)
    if settings.max_new_tokens >= context:
        print(f"warning: --max-new-tokens {settings.max_new_tokens} does not fit the context of {context}; "
              "generation stops when the context is full", file=sys.stderr)

    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    row_prompts = [prompt for prompt in args.prompts for _ in range(settings.num_return_sequences)]
    stream = TextStream(tokenizer, row_prompts, sys.stdout) if args.format == "text" else None

    start = time.perf_counter()
    completions = generate(model, prompt_ids, settings, eos_id, generator, stream)  # Ctrl-C: see run_cli
    elapsed = time.perf_counter() - start
    if stream is not None:
        stream.finish()
    else:
        for prompt, ids in zip(row_prompts, completions, strict=True):
            completion = tokenizer.decode(ids)
            record = {"prompt": prompt, "completion": completion, "text": prompt + completion, "new_tokens": len(ids)}
            print(json.dumps(record, ensure_ascii=False), flush=True)
    produced = sum(len(ids) for ids in completions)
    print(f"{produced} new tokens in {elapsed:.2f} s ({produced / max(elapsed, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0
