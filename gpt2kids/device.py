"""Choosing the device and the numeric precision (`--device`, `--precision`)."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2kids.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for CUDA but no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps asked for Apple's GPU but MPS is not available; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmul instructions (AVX512-BF16 or AMX)."""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def check_precision(name: str) -> None:
    if name not in PRECISIONS:
        raise UserError(f"--precision {name!r} is not one of {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class Precision:
    """How to compute: the autocast dtype (None for none) and whether fp16 loss scaling is needed."""

    name: str  # fp32, bf16 or fp16
    autocast_dtype: torch.dtype | None
    needs_grad_scaler: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def choose_precision(name: str, device: torch.device) -> Precision:
    """`auto`: bf16 where the device does it well, fp16 with a scaler on older CUDA, else fp32."""
    check_precision(name)
    if name == "auto":
        name = "bf16" if bf16_is_fast(device) else "fp16" if device.type == "cuda" else "fp32"
    # fp16 has a narrow range: gradients are scaled up and unscaled before clipping. On CPU this is
    # slow but runs, which is how the tests cover the path.
    return Precision(name, None if name == "fp32" else DTYPES[name], needs_grad_scaler=name == "fp16")
