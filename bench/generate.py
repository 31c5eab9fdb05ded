"""New tokens per second: gpt2kids' sampler against transformers' `generate`, on the same weights.

GPT-2 Small shapes (124M parameters, vocabulary 50257) with random weights, batch 1, a 20-token
prompt and exactly 200 new tokens on both sides (no end-of-text stop). Runs alternate between the
two implementations and the medians are reported, with each side's fraction of the memory-bandwidth
limit: decoding one token reads every weight once, so parameter bytes x tokens/s cannot exceed the
read bandwidth. The bandwidth is measured in the same run, before the first and after every pair of
timed runs (it moves with the load on a shared host), as the fastest of a few whole-tensor reductions
over 1 GiB; the median of those measurements sets the limit, and their range is printed.

    python bench/generate.py [--dtype fp32|bf16|both] [--threads N] [--repeats N] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from benchutil import machine, synchronize

from gpt2kids.decoding_kernels import optimize_for_decoding
from gpt2kids.device import resolve_device
from gpt2kids.hf import load_model
from gpt2kids.logits_processors import SamplingSettings, generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = {"greedy": dict(greedy=True), "top-k 50": dict(greedy=False, top_k=50)}


class Bandwidth:
    """Memory read bandwidth in bytes/s, measured again whenever `measure` is called."""

    def __init__(self, device: torch.device, gib: float = 1.0) -> None:
        # Far larger than any cache; two views so the reduction with the fastest kernel sets the figure.
        self.device = device
        self.floats = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32, device=device)
        self.integers = self.floats.view(torch.int64)
        self.samples: list[float] = []

    def measure(self, repeats: int = 3) -> float:
        best = float("inf")
        for reduce in (self.floats.sum, self.integers.sum):
            reduce()  # first touch, warm
            for _ in range(repeats):
                synchronize(self.device)
                start = time.perf_counter()
                reduce()
                synchronize(self.device)
                best = min(best, time.perf_counter() - start)
        self.samples.append(self.floats.numel() * 4 / best)
        return self.samples[-1]

    def median(self) -> float:
        return statistics.median(self.samples)


def timed(run: Callable[[], int], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    produced = run()
    synchronize(device)
    return produced / (time.perf_counter() - start)


def bench_dtype(folder: str, dtype_name: str, prompt: torch.Tensor, eos: int, args: argparse.Namespace,
                bandwidth: Bandwidth) -> list[tuple[str, str, float, float, int]]:
    from transformers import GPT2LMHeadModel

    dtype = DTYPES[dtype_name]
    device = bandwidth.device
    reference = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).to(device).eval()
    prompt = prompt.to(device)
    # No end-of-text stop on either side: both produce exactly --new-tokens.
    reference.generation_config.eos_token_id = None
    ours, _ = load_model(folder, device, dtype)
    weight_bytes = ours.num_parameters() * torch.finfo(dtype).bits // 8  # read once per token
    optimize_for_decoding(ours.eval())  # what generate.py does after loading
    rows = []
    for mode, options in MODES.items():
        settings = SamplingSettings(max_new_tokens=args.new_tokens, **options)

        def run_ours(settings: SamplingSettings = settings) -> int:
            out = generate(ours, [prompt[0].tolist()], settings, eos, stop_at_eos=False)
            assert len(out[0]) == args.new_tokens, len(out[0])
            return len(out[0])

        def run_reference(settings: SamplingSettings = settings) -> int:
            with torch.inference_mode():
                out = reference.generate(
                    prompt, attention_mask=torch.ones_like(prompt), do_sample=not settings.greedy,
                    top_k=None if settings.greedy else settings.top_k, top_p=1.0, temperature=1.0,
                    max_new_tokens=args.new_tokens, pad_token_id=eos)
            produced = out.shape[1] - prompt.shape[1]
            assert produced == args.new_tokens, produced
            return produced

        run_ours()  # warm-up: first-call allocations and kernel selection
        run_reference()
        speeds: dict[str, list[float]] = {"gpt2kids": [], "transformers": []}
        for _ in range(args.repeats):  # alternate, so drifting machine load hits both sides alike
            speeds["gpt2kids"].append(timed(run_ours, device))
            speeds["transformers"].append(timed(run_reference, device))
            bandwidth.measure()
        print(f"{dtype_name} {mode}: " + ", ".join(
            f"{name} {' '.join(f'{v:.1f}' for v in values)}" for name, values in speeds.items()), file=sys.stderr)
        rows.append((dtype_name, mode, statistics.median(speeds["gpt2kids"]),
                     statistics.median(speeds["transformers"]), weight_bytes))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=20)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bandwidth = Bandwidth(device)
    print(f"{machine(device)}; memory read bandwidth {bandwidth.measure() / 1e9:.1f} GB/s", file=sys.stderr)

    torch.manual_seed(0)
    eos = 50256
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        bos_token_id=eos, eos_token_id=eos)
    prompt = torch.randint(0, eos, (1, args.prompt_tokens))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        GPT2LMHeadModel(config).save_pretrained(folder)
        for dtype_name in DTYPES if args.dtype == "both" else [args.dtype]:
            rows += bench_dtype(folder, dtype_name, prompt, eos, args, bandwidth)

    rate = bandwidth.median()
    print(f"\n{machine(device)}\nGPT-2 Small (124M), batch 1, {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens, median of {args.repeats}; memory read bandwidth {rate / 1e9:.1f} GB/s "
          f"(median of {len(bandwidth.samples)} measurements, {min(bandwidth.samples) / 1e9:.1f}-"
          f"{max(bandwidth.samples) / 1e9:.1f})\n")
    print("| weights | decoding | gpt2kids tok/s | transformers tok/s | ratio | bandwidth limit tok/s "
          "| gpt2kids % of limit | transformers % of limit |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for dtype_name, mode, ours_speed, hf_speed, weight_bytes in rows:
        limit = rate / weight_bytes
        print(f"| {dtype_name} | {mode} | {ours_speed:.1f} | {hf_speed:.1f} | {ours_speed / hf_speed:.2f}x "
              f"| {limit:.0f} | {100 * ours_speed / limit:.0f}% | {100 * hf_speed / limit:.0f}% |")


if __name__ == "__main__":
    main()
