"""The model's configuration: a dataclass that reads and writes Hugging Face `config.json`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from torch import nn

from gpt2kids.errors import UserError

# The activations of HF's GPT-2 that we implement, by their config names; the three tanh names
# (GPT-2's own is gelu_new) are the same function.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_fast": lambda: nn.GELU(approximate="tanh"),
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}

# Bounds that refuse absurd configs before any memory is allocated (a config.json is untrusted input).
MAX_LAYERS = 256
MAX_WIDTH = 32_768
MAX_CONTEXT = 1 << 20
MAX_VOCAB = 4_000_000
MAX_PARAMETERS = 20_000_000_000
# Options of HF's GPT-2 that change the maths: only these values are implemented. Reading refuses
# others rather than silently compute something else; writing states them.
FIXED_OPTIONS = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
# HF's GPT2Config.attribute_map: other names config.json may use; as in transformers, the other name wins.
HF_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
              "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def num_parameters(self) -> int:
        """Parameters of the model this config builds (lm_head is tied, so not counted twice)."""
        width, layers = self.n_embd, self.n_layer
        embeddings = (self.vocab_size + self.n_positions) * width
        attention = width * 3 * width + 3 * width + width * width + width
        mlp = 2 * width * self.mlp_width + self.mlp_width + width
        norms = 4 * width
        return embeddings + layers * (attention + mlp + norms) + 2 * width

    def validate(self) -> None:
        def check(condition: bool, problem: str) -> None:
            if not condition:
                raise UserError(f"model config: {problem}")

        def is_integer(value: object) -> bool:  # not a JSON true/false, which Python counts as ints
            return type(value) is int

        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            check(is_integer(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
        for name, limit in (("n_layer", MAX_LAYERS), ("n_embd", MAX_WIDTH), ("n_positions", MAX_CONTEXT),
                            ("vocab_size", MAX_VOCAB)):
            check(getattr(self, name) <= limit, f"{name}={getattr(self, name)} is absurd (at most {limit})")
        check(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_inner is not None:
            check(is_integer(self.n_inner) and 0 < self.n_inner <= 8 * MAX_WIDTH,
                  f"n_inner={self.n_inner!r} must be a positive integer of sane size")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            check(value is None or (is_integer(value) and value >= 0),
                  f"{name} must be a token id (an integer >= 0) or null, got {value!r}")
        check(self.activation_function in ACTIVATIONS,
              f"activation_function {self.activation_function!r} is not supported "
              f"(one of {', '.join(ACTIVATIONS)})")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and 0.0 <= value < 1.0, f"{name} must be in [0, 1)")
        check(isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0,
              "layer_norm_epsilon must be positive")
        check(self.num_parameters() <= MAX_PARAMETERS,
              f"{self.num_parameters():,} parameters is absurd (at most {MAX_PARAMETERS:,})")

    def with_dropout(self, rate: float) -> GPT2Config:
        return replace(self, resid_pdrop=rate, embd_pdrop=rate, attn_pdrop=rate)

    # --- Hugging Face config.json -------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> GPT2Config:
        model_type = hf.get("model_type")
        if model_type != "gpt2":
            raise UserError(f"config.json has model_type {model_type!r}; gpt2kids loads GPT-2 models only "
                            "(model_type 'gpt2')")
        for key, supported in FIXED_OPTIONS.items():
            if key in hf and hf[key] != supported:
                raise UserError(f"config.json sets {key}={hf[key]!r}; gpt2kids supports only {supported!r}")
        known = {f.name for f in fields(cls)}
        values = {key: hf[key] for key in known if key in hf}
        if "n_positions" not in values and "n_ctx" in hf:  # very old configs name the context n_ctx
            values["n_positions"] = hf["n_ctx"]
        values.update({name: hf[alias] for alias, name in HF_ALIASES.items() if alias in hf})
        for key in ("bos_token_id", "eos_token_id"):
            if isinstance(values.get(key), list):
                values[key] = values[key][0] if values[key] else None
        try:
            return cls(**values)
        except TypeError as error:
            raise UserError(f"config.json is not a valid GPT-2 config: {error}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        return {**asdict(self), **FIXED_OPTIONS, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "n_ctx": self.n_positions, "use_cache": True}

    @classmethod
    def from_json_file(cls, path: str | Path) -> GPT2Config:
        path = Path(path)
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path} does not exist; a model folder needs a config.json") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{path} is not valid JSON ({error}); re-export or re-download the model") from None
        if not isinstance(hf, dict):
            raise UserError(f"{path} does not hold a JSON object; it is not a model config")
        return cls.from_hf_dict(hf)


PRESETS: dict[str, GPT2Config] = {
    # A CPU demo: trains on the bundled stories in minutes.
    "tiny": GPT2Config(n_positions=256, n_embd=256, n_layer=4, n_head=4),
    # GPT-2 Small, 124M parameters: the shape of flax-community/gpt2-small-indonesian.
    "small": GPT2Config(),
}


def preset(name: str, vocab_size: int, eos_token_id: int) -> GPT2Config:
    if name not in PRESETS:
        raise UserError(f"unknown model size {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], vocab_size=vocab_size, bos_token_id=eos_token_id, eos_token_id=eos_token_id)

