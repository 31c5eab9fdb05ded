"""Text in, stories out: the model behind `python generate.py`, loaded once and used for many prompts.

`choose_model` says which model a plain `python generate.py` uses and why; `StoryGenerator` holds a
model laid out for decoding and its tokenizer, turns prompt texts into token ids (cutting what does
not fit the context, with a warning) and continues them through `gpt2kids.decode_loop.generate`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2kids.config import GPT2Config
from gpt2kids.data import jsonl_field
from gpt2kids.decode_loop import StepCallback, fit_prompt, generate
from gpt2kids.decoding_kernels import optimize_for_decoding
from gpt2kids.device import resolve_device, weights_dtype_for_inference
from gpt2kids.errors import UserError
from gpt2kids.hf import load_model, load_tokenizer, resolve
from gpt2kids.logits_processors import SamplingSettings
from gpt2kids.model import GPT2
from gpt2kids.tokenizer import Tokenizer

HUB_DEFAULT = "bookbot/gpt2-indo-small-kids-stories"


def newest_export(runs: Path = Path("runs")) -> Path | None:
    """The `runs/*/final` or `runs/*/best` export whose config.json was written last."""
    configs = [config for pattern in ("*/final/config.json", "*/best/config.json") for config in runs.glob(pattern)]
    if not configs:
        return None
    return max(configs, key=lambda config: config.stat().st_mtime).parent


def choose_model(spec: str | None, runs: Path = Path("runs")) -> tuple[str, str]:
    """(the model to load, why that one): the given --model, the newest export, or the published model."""
    if spec is not None:
        return spec, "given by --model"
    found = newest_export(runs)
    if found is not None:
        return str(found), f"the newest export under {runs}/"
    return HUB_DEFAULT, f"the published model, since {runs}/ holds no export (train one with python train.py)"


def read_prompts_file(path: str) -> list[str]:
    """Prompts from a file: one per line, or a `.jsonl` with a "prompt" field; `-` reads standard input."""
    if path == "-":
        text, name = sys.stdin.read(), "standard input"
    else:
        try:
            text, name = Path(path).read_text(encoding="utf-8"), path
        except FileNotFoundError:
            raise UserError(f"--prompts-file {path} does not exist; pass a file of prompts, one per line") from None
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"--prompts-file {path} cannot be read as UTF-8 text ({error})") from None
    if path.endswith(".jsonl"):
        return jsonl_field(text.replace("\r\n", "\n"), "prompt", name)
    return [line for line in text.splitlines() if line.strip()]


def check_prompt_text(prompts: Sequence[str]) -> None:
    for number, prompt in enumerate(prompts, start=1):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            # Python maps argv bytes that are not UTF-8 to lone surrogates; no tokenizer can take those.
            raise UserError(f"prompt {number} is not valid UTF-8 text; check your terminal's or shell's "
                            "encoding (a UTF-8 locale is needed)") from None


@dataclass
class StoryGenerator:
    model: GPT2
    tokenizer: Tokenizer
    folder: Path
    device: torch.device

    @classmethod
    def load(cls, spec: str, device_name: str = "auto", precision: str = "auto") -> StoryGenerator:
        """Load `spec` (a run folder, export, HF folder or hub id) with weights laid out for decoding."""
        device = resolve_device(device_name)
        folder = resolve(spec)  # first, so that a bad --model is the only line on stderr
        dtype = weights_dtype_for_inference(precision, device, GPT2Config.from_json_file(folder / "config.json"))
        model, folder = load_model(folder, device, dtype)
        model = optimize_for_decoding(model.eval())
        tokenizer = load_tokenizer(folder)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(f"the tokenizer in {folder} has {tokenizer.vocab_size} tokens but the model only "
                            f"{model.config.vocab_size}; the tokenizer and the model do not belong together")
        return cls(model, tokenizer, folder, device)

    @property
    def description(self) -> str:
        dtype = str(self.model.transformer.wte.weight.dtype).removeprefix("torch.")
        return f"{self.device} ({dtype} weights)"

    def encode(self, prompts: Sequence[str], settings: SamplingSettings) -> list[list[int]]:
        """Token ids of each prompt; says on stderr when a prompt must lose its start to fit the context."""
        check_prompt_text(prompts)
        context = self.model.config.n_positions
        encoded = self.tokenizer.encode_batch(prompts)
        for number, ids in enumerate(encoded, start=1):
            fitted, cut = fit_prompt(ids, context, settings.max_new_tokens, self.tokenizer.eos_id)
            if cut:
                print(f"warning: prompt {number} has {len(ids)} tokens; with --max-new-tokens "
                      f"{settings.max_new_tokens} and a context of {context} only its last {len(fitted)} are used",
                      file=sys.stderr)
        return encoded

    def generate(self, prompts: Sequence[str], settings: SamplingSettings, seed: int | None = None,
                 on_tokens: StepCallback | None = None) -> list[list[int]]:
        """New token ids for each prompt (`settings.num_return_sequences` each, in order)."""
        settings.validate()
        ids = self.encode(prompts, settings)
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        return generate(self.model, ids, settings, self.tokenizer.eos_id, generator, on_tokens)
