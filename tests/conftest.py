"""Shared fixtures: small checkpoints and tokenizers made here, never downloaded."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Tests never reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

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


def hf_model(vocab_size: int = 101, n_positions: int = 64, n_embd: int = 48, n_layer: int = 2,
             n_head: int = 4, **extra):
    """A randomly initialised transformers GPT2LMHeadModel, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = vocab_size - 1
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=eos, eos_token_id=eos, **extra)
    torch.manual_seed(1234)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def hf_checkpoint(tmp_path: Path) -> Callable[..., tuple[object, Path]]:
    """Factory: save a random HF model to a folder and return (hf_model, folder)."""

    def make(name: str = "hf", **config) -> tuple[object, Path]:
        model = hf_model(**config)
        folder = tmp_path / name
        model.save_pretrained(folder)
        return model, folder

    return make
