"""Text in, stories out: a model and its tokenizer, loaded once and used for many prompts (generate.py, the page)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2kids.cli import check_seed
from gpt2kids.compiled_decoding import compile_decode_step
from gpt2kids.config import GPT2Config
from gpt2kids.decode_loop import StepCallback, fit_prompt, generate
from gpt2kids.decoding_kernels import optimize_for_decoding, weights_dtype_for_inference
from gpt2kids.device import resolve_device
from gpt2kids.errors import UserError
from gpt2kids.errors import warn as warn_on_stderr
from gpt2kids.hf import load_model, load_tokenizer, model_eos_ids, resolve
from gpt2kids.logits_processors import SamplingSettings
from gpt2kids.model import GPT2
from gpt2kids.tokenizer import Tokenizer


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
