"""Text in, stories out: the model behind `python generate.py`, loaded once and used for many prompts."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2kids.compiled_decoding import compile_decode_step
from gpt2kids.config import GPT2Config
from gpt2kids.data import jsonl_field
from gpt2kids.decode_loop import StepCallback, fit_prompt, generate
from gpt2kids.decoding_kernels import optimize_for_decoding, weights_dtype_for_inference
from gpt2kids.device import resolve_device
from gpt2kids.errors import UserError
from gpt2kids.errors import warn as warn_on_stderr
from gpt2kids.hf import load_model, load_tokenizer, model_eos_ids, resolve, run_export
from gpt2kids.logits_processors import SamplingSettings
from gpt2kids.model import GPT2
from gpt2kids.text_output import TextStream, write_jsonl
from gpt2kids.tokenizer import Tokenizer

HUB_DEFAULT = "bookbot/gpt2-indo-small-kids-stories"
PROMPTS_PER_BATCH = 16  # prompts decoded together from --prompts-file: one forward serves them all
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes seeds below this (it wraps negative ones: refused)


def check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise UserError(f"seed must be a whole number from 0 to {SEED_LIMIT - 1}, got {seed}")


def choose_model(spec: str | None, runs: Path = Path("runs")) -> tuple[str, str]:
    """(the model to load, why that one): the given --model, the newest export under `runs`, or the published one."""
    if spec == "":  # an unset shell variable: not "the default", and not "."
        raise UserError("--model is empty; name a run folder, an export, an HF folder or a hub id, or leave the flag "
                        "out")
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


def check_prompt_text(prompts: Sequence[str], first_number: int = 1) -> None:
    for number, prompt in enumerate(prompts, start=first_number):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            # Python maps argv bytes that are not UTF-8 to lone surrogates; no tokenizer can take those.
            raise UserError(f"prompt {number} is not valid UTF-8 text; check your terminal's or shell's "
                            "encoding (a UTF-8 locale is needed)") from None


@dataclass
class StoryGenerator:
    """A model laid out for decoding and its tokenizer: prompt texts in, stories out."""

    model: GPT2
    tokenizer: Tokenizer
    end_ids: tuple[int, ...] = ()  # the model's end ids beside the tokenizer's end-of-text (see decode)

    def __post_init__(self) -> None:
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise UserError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                            f"{self.model.config.vocab_size}; the tokenizer and the model do not belong together")

    @classmethod
    def load(cls, spec: str | Path, device_name: str = "auto", precision: str = "auto",
             compile_step: bool = False) -> StoryGenerator:
        """Load `spec` (a run folder, export, HF folder or hub id) with weights laid out for decoding, or
        with its decode step compiled (`compile_step`)."""
        device = resolve_device(device_name)
        folder = resolve(spec)  # first, so that a bad --model is the only line on stderr
        dtype = weights_dtype_for_inference(precision, device, GPT2Config.from_json_file(folder / "config.json"))
        model, folder = load_model(folder, device, dtype)
        model = compile_decode_step(model) if compile_step else optimize_for_decoding(model)
        return cls(model, load_tokenizer(folder), tuple(model_eos_ids(folder)))

    @property
    def description(self) -> str:
        weight = self.model.transformer.wte.weight
        return f"{weight.device} ({str(weight.dtype).removeprefix('torch.')} weights)"

    def encode(self, prompts: Sequence[str], max_new_tokens: int,
               warn: Callable[[str], None] = warn_on_stderr, first_number: int = 1) -> list[list[int]]:
        """Token ids of each prompt; warns when a prompt must lose its start to fit the context.

        Messages number the prompts from `first_number` (a later batch of a prompts file goes on counting).
        """
        check_prompt_text(prompts, first_number)
        context = self.model.config.n_positions
        encoded = self.tokenizer.encode_batch(prompts)
        for number, ids in enumerate(encoded, start=first_number):
            fitted, cut = fit_prompt(ids, context, max_new_tokens, self.tokenizer.eos_id)
            if cut:
                warn(f"prompt {number} has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} and a "
                     f"context of {context} only its last {len(fitted)} "
                     f"{'are' if len(fitted) > 1 else 'is'} used")
        return encoded

    def random_numbers(self, seed: int | None) -> torch.Generator | None:
        """The generator sampling draws from: seeded, or None for torch's global one."""
        check_seed(seed)
        device = self.model.transformer.wte.weight.device
        return None if seed is None else torch.Generator(device=device).manual_seed(seed)

    def decode(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings,
               generator: torch.Generator | None = None, on_tokens: StepCallback | None = None) -> list[list[int]]:
        """New token ids for each prompt (`settings.num_return_sequences` each, in order); a sequence ends at
        the tokenizer's end-of-text or at any end id the model's generation_config.json lists."""
        return generate(self.model, prompts, settings, self.tokenizer.eos_id, generator, on_tokens,
                        more_end_ids=self.end_ids)

    def write_stories(self, prompts: Sequence[str], settings: SamplingSettings, output_format: str,
                      seed: int | None) -> int:
        """Print the stories of `prompts` on stdout, a batch at a time; returns the number of new tokens."""
        generator = self.random_numbers(seed)  # one for every batch: a later batch draws on, it does not repeat
        produced = 0
        for start in range(0, len(prompts), PROMPTS_PER_BATCH):
            batch = prompts[start:start + PROMPTS_PER_BATCH]
            ids = self.encode(batch, settings.max_new_tokens, first_number=start + 1)
            rows = [prompt for prompt in batch for _ in range(settings.num_return_sequences)]
            if output_format == "jsonl":
                completions = self.decode(ids, settings, generator)
                write_jsonl(self.tokenizer, rows, completions, sys.stdout)
            else:
                if start > 0:
                    sys.stdout.write("\n")
                stream = TextStream(self.tokenizer, rows, sys.stdout)
                try:
                    completions = self.decode(ids, settings, generator, stream)
                except UserError:
                    sys.stdout.write("\n")  # the streamed line ends, so the error line starts on its own
                    raise
                stream.finish()
            produced += sum(map(len, completions))
        return produced

    def interact(self, settings: SamplingSettings, output_format: str, seed: int | None) -> None:
        """A prompt loop on standard input; a blank line (empty or only spaces) or end of input ends it."""
        print("type a prompt and press Enter; a blank line or Ctrl-D ends", file=sys.stderr)
        while sys.stdin is not None:  # closed (`<&-`): as at the end of input
            print("> ", end="", file=sys.stderr, flush=True)
            raw = getattr(sys.stdin, "buffer", sys.stdin).readline()  # bytes, or text from a text stream
            try:
                line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError:
                warn_on_stderr("that line is not UTF-8 text (check the terminal's encoding); type it again")
                continue
            if not line.strip():
                return
            self.write_stories([line.rstrip("\r\n")], settings, output_format, seed)
