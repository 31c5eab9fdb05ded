"""Shared set-up of the benchmarks: a random-init HF folder, the machine, the FLOP model, contention.

Imported by bench/train_step.py, bench/train_epoch.py and bench/generate.py (the script's folder is
on sys.path).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gpt2kids import data  # noqa: E402
from gpt2kids.config import GPT2Config, preset  # noqa: E402
from gpt2kids.hf import empty_model, export  # noqa: E402
from gpt2kids.model import GPT2  # noqa: E402
from gpt2kids.tokenizer import Tokenizer  # noqa: E402

SEED = 42
# The vocabulary each size's model has. The tokenizer trained on ~200 KB of stories stops short of
# 50257 merges, which only matters for which ids occur, not for the cost: the head is 50257 wide.
VOCAB = {"small": 50257, "tiny": 8000}


def make_model_folder(size: str, folder: Path) -> GPT2Config:
    """Train a BPE on the bundled stories, build a random-init model of `size`, export both to `folder`.

    The exported config keeps GPT-2's dropout of 0.1, as a real checkpoint does; each side of a
    benchmark turns it off (or not) itself.
    """
    torch.manual_seed(SEED)
    tokenizer = Tokenizer.train(data.read_stories(data.BUNDLED_STORIES), VOCAB[size])
    config = preset(size, VOCAB[size], tokenizer.eos_id)
    export(GPT2(config), tokenizer, folder)
    return config


@dataclass(frozen=True)
class FlopModel:
    """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add).

    6 * N_nonembedding       the blocks' matmul weights (embeddings are look-ups, not matmuls)
    + 12 * n_layer * n_embd * block   attention scores and weighted sum, QK^T and AV, counted in
                                      full as in the PaLM appendix (causal masking would halve it)
    + 6 * n_embd * vocab     the tied LM head
    """

    non_embedding_params: int
    n_layer: int
    n_embd: int
    vocab_size: int

    @classmethod
    def of(cls, config: GPT2Config) -> FlopModel:
        model = empty_model(config)
        embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
        return cls(model.num_parameters() - embeddings, config.n_layer, config.n_embd, config.vocab_size)

    def per_token(self, block: int) -> float:
        return (6 * self.non_embedding_params + 12 * self.n_layer * self.n_embd * block
                + 6 * self.n_embd * self.vocab_size)


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 3072, repeats: int = 5) -> float:
    """FLOP/s of the best of a few square matmuls of `size` in `dtype`: the roof MFU is measured against."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up: thread pool, kernel selection
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> str:
    """One line naming the hardware and software the figures came from."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        model = platform.processor() or platform.machine()
        try:
            lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
            for line in lscpu.splitlines():
                if line.startswith("Model name:"):
                    model = line.split(":", 1)[1].strip()
        except OSError:
            pass
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        extras = [name for name in ("avx512_bf16", "amx_bf16") if name in flags]
        hardware = f"{model}, {torch.get_num_threads()} threads" + (f" ({', '.join(extras)})" if extras else "")
    return f"{hardware}; torch {torch.__version__}; Python {platform.python_version()}"


def gib(n_bytes: float) -> str:
    return f"{n_bytes / (1 << 30):.2f} GiB"


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (all processes, and steal), or None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait.
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def foreign_share(busy_before: float | None, busy_after: float | None, own_cpu_seconds: float,
                  wall_seconds: float) -> float | None:
    """The fraction of the machine's CPUs that work other than the measured one used over `wall_seconds`."""
    if busy_before is None or busy_after is None:
        return None
    return max(0.0, busy_after - busy_before - own_cpu_seconds) / (wall_seconds * (os.cpu_count() or 1))


def report(results: dict, json_path: Path | None, table: str) -> None:
    """Print the results' table; with --json, also write the results there."""
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(table)
