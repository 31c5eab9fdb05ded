"""What `python generate.py` does with its settings: choose and load the model, then write the stories of
the prompts on stdout, loop on standard input (--interactive), or serve the page (--serve).

Only generated text goes to stdout; which model, warnings and timings go to stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gpt2kids.data import jsonl_field
from gpt2kids.decoding_kernels import check_inference_precision
from gpt2kids.device import resolve_device
from gpt2kids.errors import UserError, warn
from gpt2kids.generate_config import HUB_DEFAULT, GenerateConfig
from gpt2kids.hf import resolve, run_export
from gpt2kids.logits_processors import SamplingSettings
from gpt2kids.text_generation import StoryGenerator, check_prompt_text
from gpt2kids.text_output import TextStream, write_jsonl

PROMPTS_PER_BATCH = 16  # prompts decoded together from --prompts-file: one forward serves them all


def run(config: GenerateConfig) -> None:
    """Check `config`, then generate as it says; raises `UserError` for anything a user can fix."""
    config.validate()
    prompts = list(config.prompts)
    if config.prompts_file is not None:
        prompts += read_prompts_file(config.prompts_file)
        if not prompts:
            raise UserError(f"--prompts-file {config.prompts_file} holds no prompts (blank lines are skipped); write "
                            "one prompt per line, or a .jsonl with a \"prompt\" field")
    check_prompt_text(prompts)  # before anything is loaded or printed
    if config.serve:
        from gpt2kids.serve import check_address, require_gradio

        require_gradio()  # before the model loads, so that a missing extra is the only line
        check_address(config.host, config.port)  # and a port that is taken, or out of range
    # A bad --device or --precision is the only line on stderr, before the model is named and loaded.
    check_inference_precision(config.precision, resolve_device(config.device))
    spec, why = choose_model(config.model)
    try:
        folder = resolve(spec)  # a hub id is fetched (or found in the cache) once, here
    except UserError as error:
        if config.model is not None:
            raise
        raise UserError(f"{error} (no --model given: {why})") from None  # a model the user never named
    print(f"model: {folder}: {why}", file=sys.stderr)  # first: the kernel choice may print a line too
    generator = StoryGenerator.load(folder, config.device, config.precision, config.compile)
    print(f"loaded on {generator.description}", file=sys.stderr)
    settings, context = config.sampling, generator.model.config.n_positions
    if settings.max_new_tokens > context:  # a one-token prompt and N new tokens take N positions
        warn(f"--max-new-tokens {settings.max_new_tokens} does not fit the context of {context}; a prompt keeps what "
             "fits of it and generation stops when the context is full")
    if config.serve:
        from gpt2kids.serve import WIDGET_PROMPT, serve

        serve(generator, config.host, config.port, model_name=spec,
              prompt=prompts[0] if prompts else WIDGET_PROMPT, defaults=settings, seed=config.seed)
    elif config.interactive:
        interact(generator, settings, config.format, config.seed)
    else:
        start = time.perf_counter()
        produced = write_stories(generator, prompts, settings, config.format, config.seed)
        elapsed = time.perf_counter() - start
        print(f"{produced} new token{'' if produced == 1 else 's'} in {elapsed:.2f} s "
              f"({produced / max(elapsed, 1e-9):.1f} tokens/s)", file=sys.stderr)


def choose_model(spec: str | None, runs: Path = Path("runs")) -> tuple[str, str]:
    """(the model to load, why that one): the given --model, the newest export under `runs`, or the published one."""
    if spec is not None:
        return spec, "given by --model"
    configs = [config for pattern in ("*/final/config.json", "*/best/config.json") for config in runs.glob(pattern)]
    if configs:  # the run whose export is newest, through the export a run folder means
        run = max(configs, key=lambda config: config.stat().st_mtime).parent.parent
        return str(run_export(run)), f"the newest export under {runs}/"
    return HUB_DEFAULT, f"the published model, since {runs}/ holds no export (train one with python train.py)"


def read_prompts_file(path: str) -> list[str]:
    """Prompts from a file: one per line, or a `.jsonl` with a "prompt" field; `-` reads standard input."""
    if path == "-":
        text, name = read_standard_input(), "standard input"
    else:
        try:
            text, name = Path(path).read_text(encoding="utf-8-sig"), path  # a BOM is no prompt
        except FileNotFoundError:
            raise UserError(f"--prompts-file {path} does not exist; pass a file of prompts, one per line") from None
        except IsADirectoryError:
            raise UserError(f"--prompts-file {path} is a folder; pass a file of prompts, one per line") from None
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"--prompts-file {path} cannot be read as UTF-8 text ({error})") from None
    # A lone CR ends a line too, in a file and on standard input alike, as data.py reads stories.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if path.lower().endswith(".jsonl"):
        return jsonl_field(text, "prompt", name)
    # Lines end at "\n" only: str.splitlines would also cut a prompt at form feeds and Unicode separators.
    return [line for line in text.split("\n") if line.strip()]


def read_standard_input() -> str:
    """All of standard input as UTF-8 text (bytes, decoded here: the terminal's encoding may be stricter)."""
    if sys.stdin is None:  # closed (`<&-`): nothing to read
        return ""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream put in its place
        return sys.stdin.read()
    try:
        return stream.read().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"standard input is not UTF-8 text (byte {error.start} is not); save the prompts as "
                        "UTF-8") from None


def write_stories(generator: StoryGenerator, prompts: Sequence[str], settings: SamplingSettings,
                  output_format: str, seed: int | None) -> int:
    """Print the stories of `prompts` on stdout, a batch at a time; returns the number of new tokens."""
    numbers = generator.random_numbers(seed)  # one for every batch: a later batch draws on, it does not repeat
    produced = 0
    for start in range(0, len(prompts), PROMPTS_PER_BATCH):
        batch = prompts[start:start + PROMPTS_PER_BATCH]
        ids = generator.encode(batch, settings.max_new_tokens, first_number=start + 1)
        rows = [prompt for prompt in batch for _ in range(settings.num_return_sequences)]
        if output_format == "jsonl":
            completions = generator.decode(ids, settings, numbers)
            write_jsonl(generator.tokenizer, rows, completions, sys.stdout)
        else:
            if start > 0:
                sys.stdout.write("\n")
            stream = TextStream(generator.tokenizer, rows, sys.stdout)
            try:
                completions = generator.decode(ids, settings, numbers, stream)
            except UserError:
                sys.stdout.write("\n")  # the streamed line ends, so the error line starts on its own
                raise
            stream.finish()
        produced += sum(map(len, completions))
    return produced


def interact(generator: StoryGenerator, settings: SamplingSettings, output_format: str, seed: int | None) -> None:
    """A prompt loop on standard input; a blank line (empty or only spaces) or end of input ends it."""
    print("type a prompt and press Enter; a blank line or Ctrl-D ends", file=sys.stderr)
    while sys.stdin is not None:  # closed (`<&-`): as at the end of input
        print("> ", end="", file=sys.stderr, flush=True)
        raw = getattr(sys.stdin, "buffer", sys.stdin).readline()  # bytes, or text from a text stream
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            warn("that line is not UTF-8 text (check the terminal's encoding); type it again")
            continue
        if not line.strip():
            return
        write_stories(generator, [line.rstrip("\r\n")], settings, output_format, seed)
