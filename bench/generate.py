"""New tokens per second: gpt2kids' sampler against transformers' `generate`, on the same weights.

GPT-2 Small shapes (124M parameters, vocabulary 50257; `--model-size tiny` for smoke runs) with
random weights, 20-token prompts, no end-of-text stop on either side, at batch 1 and at batch 8
(8 different prompts, decoded together).
Each figure is a rate taken from two runs: one producing `--short-tokens` (20) new tokens and one
producing that many more (`--new-tokens`, 200, at batch 1; `--batch-new-tokens`, 100, at batch 8):
the difference of their times is the time of the extra decode steps alone, without the prompt's
forward pass and the set-up. Every side runs both lengths in each of `--repeats` (3) rounds, which
alternate the sides and the order within a round, so a load that drifts on a shared host hits all
alike; the best time of each length is kept. Batch 8 rates count the new tokens of all 8 rows.

Beside each rate is its fraction of the memory-bandwidth limit: a decode step reads every weight
once (for all rows of the batch), so parameter bytes x steps/s cannot exceed the read bandwidth.
The bandwidth is measured in the same run, before the first and after every round (it moves with the
load on a shared host), as the fastest of a few whole-tensor reductions over 1 GiB; the median of
those measurements sets the limit, and their range is printed. The last column compares gpt2kids
with transformers in whichever dtype transformers decoded that batch and mode faster.

    python bench/generate.py [--dtype fp32|bf16|both] [--repeats 3] [--threads N] [--device auto|cpu|cuda]
                             [--new-tokens 200] [--batch 8] [--batch-new-tokens 100] [--short-tokens 20]
                             [--kernel NAME]   # force one decoding kernel (see gpt2kids.decoding_kernels)
                             [--compile]       # gpt2kids' decode step compiled (generate.py --compile)
                             [--model-size small|tiny]
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

from gpt2kids.compiled_decoding import compile_decode_step
from gpt2kids.config import GPT2Config as OurConfig
from gpt2kids.decode_loop import generate
from gpt2kids.decoding_kernels import optimize_for_decoding, weights_dtype_for_inference
from gpt2kids.device import resolve_device
from gpt2kids.hf import load_model
from gpt2kids.logits_processors import SamplingSettings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = {"greedy": dict(greedy=True), "top-k 50": dict(greedy=False, top_k=50)}
SIDES = ("gpt2kids", "transformers")
SIZES = {"small": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
         "tiny": dict(vocab_size=8000, n_positions=256, n_embd=256, n_layer=4, n_head=4)}


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


def seconds(run: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def bench_dtype(folder: str, dtype_name: str, prompts: dict[int, torch.Tensor], eos: int,
                args: argparse.Namespace, bandwidth: Bandwidth) -> list[dict]:
    from transformers import GPT2LMHeadModel

    dtype = DTYPES[dtype_name]
    device = bandwidth.device
    reference = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).to(device).eval()
    # No end-of-text stop on either side: both produce exactly the tokens asked for.
    reference.generation_config.eos_token_id = None
    ours, _ = load_model(folder, device, dtype)
    weight_bytes = ours.num_parameters() * torch.finfo(dtype).bits // 8  # read once per step
    if args.compile:  # each batch size compiles in the untimed warm-up run
        compile_decode_step(ours)
    else:
        optimize_for_decoding(ours, args.kernel)  # what generate.py does after loading
    rows = []
    for batch, batch_prompts in prompts.items():
        batch_prompts = batch_prompts.to(device)
        extra = args.new_tokens if batch == 1 else args.batch_new_tokens
        lengths = (args.short_tokens, args.short_tokens + extra)
        for mode, options in MODES.items():

            def run_ours(new_tokens: int, options: dict = options,
                         batch_prompts: torch.Tensor = batch_prompts) -> None:
                settings = SamplingSettings(max_new_tokens=new_tokens, **options)
                out = generate(ours, batch_prompts.tolist(), settings, eos, stop_at_eos=False)
                assert [len(row) for row in out] == [new_tokens] * len(out)

            def run_reference(new_tokens: int, options: dict = options,
                              batch_prompts: torch.Tensor = batch_prompts) -> None:
                with torch.inference_mode():
                    out = reference.generate(
                        batch_prompts, attention_mask=torch.ones_like(batch_prompts),
                        do_sample=not options["greedy"], top_k=options.get("top_k"), top_p=1.0, temperature=1.0,
                        max_new_tokens=new_tokens, pad_token_id=eos)
                assert out.shape[1] - batch_prompts.shape[1] == new_tokens

            runs = {"gpt2kids": run_ours, "transformers": run_reference}
            for run in runs.values():  # warm-up: first-call allocations, kernel set-up
                run(lengths[0])
            times = {(side, length): [] for side in SIDES for length in lengths}
            for round_index in range(args.repeats):
                # Alternate which side goes first and which length, round by round.
                order = SIDES if round_index % 2 == 0 else SIDES[::-1]
                for side in order:
                    for length in lengths if round_index % 2 == 0 else lengths[::-1]:
                        times[side, length].append(seconds(lambda run=runs[side], n=length: run(n), device))
                bandwidth.measure()
            rates = {}
            for side in SIDES:
                short, long = (min(times[side, length]) for length in lengths)
                # nan when noise made the longer run no slower: no rate can be read from that pair.
                rates[side] = batch * extra / (long - short) if long > short else float("nan")
            print(f"batch {batch} {dtype_name} {mode}: " + "; ".join(
                f"{side} {'/'.join(f'{t:.2f}' for t in times[side, length])} s for {length} tokens"
                for side in SIDES for length in lengths), file=sys.stderr)
            rows.append(dict(batch=batch, dtype=dtype_name, mode=mode, ours=rates["gpt2kids"],
                             theirs=rates["transformers"], weight_bytes=weight_bytes))
    return rows


def table(rows: list[dict], rate: float) -> str:
    lines = ["| batch | weights | decoding | gpt2kids tok/s | transformers tok/s | ratio | bandwidth limit tok/s "
             "| gpt2kids % of limit | transformers % of limit | vs transformers' better dtype |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        # The weights are read once per step, whatever the batch: the limit grows with the batch.
        limit = row["batch"] * rate / row["weight_bytes"]
        best_theirs = max(other["theirs"] for other in rows
                          if other["batch"] == row["batch"] and other["mode"] == row["mode"])
        lines.append(f"| {row['batch']} | {row['dtype']} | {row['mode']} | {row['ours']:.1f} | {row['theirs']:.1f} "
                     f"| {row['ours'] / row['theirs']:.2f}x | {limit:.0f} | {100 * row['ours'] / limit:.0f}% "
                     f"| {100 * row['theirs'] / limit:.0f}% | {row['ours'] / best_theirs:.2f}x |")
    return "\n".join(lines)


def auto_check(rows: list[dict], picked: str) -> str:
    """What `--precision auto` picks here, against the rates measured in both dtypes: it must never decode
    slower than fp32 (issue 13). Batches and modes measured in only one dtype are left out."""
    rate = {(row["batch"], row["mode"], row["dtype"]): row["ours"] for row in rows}
    cases = sorted({(batch, mode) for batch, mode, _ in rate if all((batch, mode, d) in rate for d in DTYPES)})
    if not cases:
        return f"--precision auto picks {picked} here (run with --dtype both to compare it with fp32)"
    ratio = {case: rate[(*case, picked)] / rate[(*case, "fp32")] for case in cases}
    figures = "; ".join(f"batch {batch} {mode} {ratio[batch, mode]:.2f}x ({rate[batch, mode, picked]:.1f} against "
                        f"{rate[batch, mode, 'fp32']:.1f} tok/s)" for batch, mode in cases)
    slower = [f"batch {batch} {mode}" for (batch, mode), value in ratio.items() if value < 1]
    verdict = f"slower than fp32 at {', '.join(slower)}" if slower else "not slower than fp32 in any row"
    return f"--precision auto picks {picked} here; its rate over fp32's: {figures}; {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best time is kept")
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens timed at batch 1")
    parser.add_argument("--batch", type=int, default=8, help="the batched run's number of prompts (0: none)")
    parser.add_argument("--batch-new-tokens", type=int, default=100, help="tokens per row timed at --batch")
    parser.add_argument("--short-tokens", type=int, default=20, help="the short run, whose time is subtracted")
    parser.add_argument("--prompt-tokens", type=int, default=20)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--kernel", default=None, help="force one decoding kernel, e.g. linear, mv, bag, split/cols")
    parser.add_argument("--compile", action="store_true",
                        help="compile gpt2kids' decode step, as generate.py --compile (transformers stays eager)")
    parser.add_argument("--model-size", default="small", choices=tuple(SIZES),
                        help="tiny: 4 layers, 256 wide, vocabulary 8000, for smoke runs of this script")
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
    shape = SIZES[args.model_size]
    eos = shape["vocab_size"] - 1
    config = GPT2Config(**shape, bos_token_id=eos, eos_token_id=eos)
    prompts = {1: torch.randint(0, eos, (1, args.prompt_tokens))}
    if args.batch > 1:
        prompts[args.batch] = torch.randint(0, eos, (args.batch, args.prompt_tokens))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        GPT2LMHeadModel(config).save_pretrained(folder)
        # What generate.py's --precision auto would hold the weights in (measured and cached on first use).
        auto = weights_dtype_for_inference("auto", device, OurConfig.from_json_file(f"{folder}/config.json"))
        for dtype_name in DTYPES if args.dtype == "both" else [args.dtype]:
            rows += bench_dtype(folder, dtype_name, prompts, eos, args, bandwidth)
    rows.sort(key=lambda row: (row["batch"], row["dtype"], row["mode"] != "greedy"))

    rate = bandwidth.median()
    model_name = "GPT-2 Small (124M)" if args.model_size == "small" else "the tiny model (4 x 256)"
    compiled = "; gpt2kids with its decode step compiled (--compile), transformers eager" if args.compile else ""
    print(f"\n{machine(device)}\n{model_name}{compiled}, {args.prompt_tokens}-token prompts; rates from "
          f"{args.short_tokens}- vs {args.short_tokens + args.new_tokens}-token runs at batch 1"
          + (f" and {args.short_tokens}- vs {args.short_tokens + args.batch_new_tokens}-token runs at batch "
             f"{args.batch} (tokens of all rows)" if args.batch > 1 else "")
          + f", best of {args.repeats} interleaved rounds; memory read bandwidth {rate / 1e9:.1f} GB/s "
          f"(median of {len(bandwidth.samples)} measurements, {min(bandwidth.samples) / 1e9:.1f}-"
          f"{max(bandwidth.samples) / 1e9:.1f})\n")
    print(table(rows, rate))
    print("\n" + auto_check(rows, {dtype: name for name, dtype in DTYPES.items()}[auto]))


if __name__ == "__main__":
    main()
