"""How `--precision auto` chooses, on every kind of machine (the hardware is faked, so this runs anywhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt2kids import device
from gpt2kids.decoding_kernels import weights_dtype_for_inference
from gpt2kids.device import choose_precision

CUDA, CPU, MPS = torch.device("cuda"), torch.device("cpu"), torch.device("mps")


@pytest.fixture
def cpuinfo(monkeypatch):
    """Fake /proc/cpuinfo: set `text` (None: the file cannot be read)."""
    fake = {"text": None}
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == Path("/proc/cpuinfo"):
            if fake["text"] is None:
                raise FileNotFoundError(2, "No such file or directory", str(self))
            return fake["text"]
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    device.cpu_has_fast_bf16.cache_clear()  # the answer is cached per process
    yield fake
    device.cpu_has_fast_bf16.cache_clear()


def cpu_flags(*flags: str) -> str:
    common = "fpu sse sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni"
    return f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {common} {' '.join(flags)}\n\n"


@pytest.mark.parametrize("text, fast", [
    (cpu_flags("avx512_bf16"), True),  # AMD Zen 4, Intel Cooper Lake
    (cpu_flags("amx_bf16", "amx_tile", "amx_int8"), True),  # Intel Sapphire Rapids and later
    (cpu_flags(), False),  # AVX-512 without bf16 instructions
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm\n", False),  # an ARM CPU
    (None, False),  # no /proc/cpuinfo (macOS, Windows)
])
def test_cpu_bf16_is_read_from_cpuinfo(cpuinfo, text, fast):
    cpuinfo["text"] = text
    assert device.cpu_has_fast_bf16() is fast
    assert choose_precision("auto", CPU).name == ("bf16" if fast else "fp32")


@pytest.mark.parametrize("measured", [torch.float32, torch.bfloat16])
def test_decoding_auto_on_cpu_follows_the_measurement_not_the_flags(cpuinfo, monkeypatch, measured):
    from gpt2kids import decoding_kernels

    cpuinfo["text"] = cpu_flags("avx512_bf16")  # flags that would say bf16
    monkeypatch.setattr(decoding_kernels, "decoding_dtype", lambda config=None, **kwargs: measured)
    assert weights_dtype_for_inference("auto", CPU) == measured


@pytest.mark.parametrize("bf16, name, dtype, scaler", [
    (True, "bf16", torch.bfloat16, False),  # Ampere and later
    (False, "fp16", torch.float16, True),  # older CUDA GPUs: fp16 needs loss scaling
])
def test_auto_on_cuda(monkeypatch, bf16, name, dtype, scaler):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: not bf16)  # the CPU must not matter
    chosen = choose_precision("auto", CUDA)
    assert (chosen.name, chosen.autocast_dtype, chosen.needs_grad_scaler) == (name, dtype, scaler)
    # Decoding holds the weights in bf16 where it is fast, else fp32 (never fp16 unless asked).
    assert weights_dtype_for_inference("auto", CUDA) == (torch.bfloat16 if bf16 else torch.float32)


@pytest.mark.parametrize("cpu_fast", [True, False])
def test_auto_on_cpu_and_mps_ignores_cuda(monkeypatch, cpu_fast):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: cpu_fast)
    chosen = choose_precision("auto", CPU)
    expected = ("bf16", torch.bfloat16) if cpu_fast else ("fp32", None)
    assert (chosen.name, chosen.autocast_dtype, chosen.needs_grad_scaler) == (*expected, False)
    mps = choose_precision("auto", MPS)
    assert (mps.name, mps.autocast_dtype, mps.needs_grad_scaler) == ("fp32", None, False)


@pytest.mark.parametrize("target", [CPU, CUDA])
def test_explicit_precisions_are_taken_as_asked(monkeypatch, target):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    got = {name: choose_precision(name, target) for name in ("fp32", "bf16", "fp16")}
    assert {name: (p.name, p.autocast_dtype, p.needs_grad_scaler) for name, p in got.items()} == {
        "fp32": ("fp32", None, False), "bf16": ("bf16", torch.bfloat16, False), "fp16": ("fp16", torch.float16, True)}
