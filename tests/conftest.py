"""Shared fixtures: small checkpoints and tokenizers made here, never downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Tests never reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
# bf16 logits: both sides round every matmul's operands and result to 8 significant bits and add in
# their own orders; a few roundings of 2**-8 relative to the logits' scale.
BF16_LOGIT_TOLERANCE = 4 * 2.0 ** -8

SAMPLE_TEXTS = [
    "Pada suatu hari, Sari pergi ke pasar bersama ibunya. \"Bu, boleh aku beli mangga?\" tanyanya.",
    "Kancil melompat ke seberang sungai! Buaya-buaya menunggu dengan sabar... 🐊🌊",
    "Budi suka membaca buku cerita.\nSetiap malam, ayah membacakan dongeng untuknya.\n\nTamat.",
    "Di Bali, Made dan Putu membuat layang-layang merah; mereka menerbangkannya di pantai Sanur.",
    "Archie sedang mengendarai roket ke planet Mars. 🚀 Bintang-bintang berkelip: satu, dua, tiga!",
    "Intan menanam pohon mangga kecil di halaman. Ia menyiraminya setiap pagi (kecuali hari Minggu).",
] * 4


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    from gpt2kids.tokenizer import Tokenizer

    return Tokenizer.train(SAMPLE_TEXTS, vocab_size=400)


def randomise(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Every parameter random: the weight matrices are already (GPT-2's N(0, 0.02)); biases and
    LayerNorms are drawn too, so a swapped ln_1/ln_2 or a dropped bias changes the logits, which a fresh
    initialisation (biases 0, LayerNorms the identity) would hide."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.normal_(1.0 if ".ln_" in name and name.endswith(".weight") else 0.0, std)
    return model


def hf_model(vocab_size: int = 101, n_positions: int = 64, n_embd: int = 48, n_layer: int = 2,
             n_head: int = 4, **extra):
    """A transformers GPT2LMHeadModel with every parameter random, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = vocab_size - 1
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=eos, eos_token_id=eos, **extra)
    torch.manual_seed(1234)
    return randomise(GPT2LMHeadModel(config)).eval()


@pytest.fixture
def hf_checkpoint(tmp_path: Path) -> Callable[..., tuple[object, Path]]:
    """Factory: save a random HF model to a folder and return (hf_model, folder)."""

    def make(name: str = "hf", **config) -> tuple[object, Path]:
        model = hf_model(**config)
        folder = tmp_path / name
        model.save_pretrained(folder)
        return model, folder

    return make


# --- tiny training runs ---------------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory) -> None:
    """One token cache for the session, away from the user's (subprocesses inherit it)."""
    os.environ["GPT2KIDS_CACHE"] = str(tmp_path_factory.getbasetemp() / "token-cache")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Twelve bundled stories: enough for a split, small enough for seconds-long epochs."""
    from gpt2kids.data import BUNDLED_STORIES

    folder = tmp_path_factory.mktemp("corpus")
    for story in sorted(BUNDLED_STORIES.glob("*.txt"))[::4]:
        shutil.copy(story, folder / story.name)
    return folder


@pytest.fixture(scope="session")
def init_folder(tmp_path_factory, tokenizer) -> Path:
    """A small random transformers GPT-2 with the session's tokenizer, as an HF folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("init")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    randomise(GPT2LMHeadModel(config)).save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def config_for(init_folder: Path, corpus: Path, out: Path, **overrides):
    """A TrainConfig for a seconds-long CPU run of the tiny init model."""
    from gpt2kids.train_config import TrainConfig

    settings = dict(data=str(corpus), init=str(init_folder), out=str(out), epochs=2, batch_size=4, block_size=64,
                    lr=1e-3, precision="fp32", device="cpu", seed=3)
    return TrainConfig(**{**settings, **overrides})


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoint" / "model.safetensors")


def run_train(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def model_folder(tokenizer, tmp_path_factory) -> Path:
    """A small random GPT-2 exported with the session's tokenizer: what generate.py loads in tests."""
    from gpt2kids.config import GPT2Config
    from gpt2kids.hf import export
    from gpt2kids.model import GPT2

    torch.manual_seed(5)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    folder = tmp_path_factory.mktemp("export") / "final"
    export(GPT2(config), tokenizer, folder)
    return folder
