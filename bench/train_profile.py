"""Where one gpt2kids training step spends its time and its memory, on the machine that runs it.

The step is exactly what `python train.py` runs (`prepare_run` + `optimizer_step`, set up as
`train_step.py`'s gpt2kids side: constant lr 5e-5, clipping at 1.0), on a random-init
HF folder of GPT-2 Small shapes (or `--model-size tiny`) and blocks of the bundled stories, in a
worker process of its own (so that its memory is the training's alone, as in `train_step.py`). After
`--warmup` steps:

- memory (CPU): `--steps` steps with the process's resident memory sampled every 2 ms, the highest
  value kept per phase of the step: the blocks' forward, the LM head and its loss, the backward, the
  embeddings' backward and gradient clipping, the optimizer's update. (On CUDA: the allocator's peak
  per step instead.)
- time: then one step under `torch.profiler`; its operators' self time summed by kind (matrix
  products, attention, elementwise and the rest, the optimizer), then the operators that took the most.

    python bench/train_profile.py [--model-size small|tiny] [--batch 4] [--block 512] [--precision auto]
                                  [--dropout 0.0] [--device auto] [--warmup 2] [--steps 3] [--top 12]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from benchutil import SEED, machine, make_model_folder
from train_step import GPT2KidsSide

# Operator name prefixes (as torch.profiler names them) by kind; what matches none is "elementwise and other".
KINDS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                        "mkldnn::"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
    "optimizer": ("aten::_fused_adamw", "aten::_foreach_"),
}
PHASES = ("forward", "LM head and loss", "backward", "embeddings' backward, clipping", "optimizer update")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", default="small", choices=("small", "tiny"))
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--block", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--dropout", type=float, default=0.0, help="0.1 is what train.py keeps for GPT-2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--steps", type=int, default=3, help="steps sampled for memory")
    parser.add_argument("--top", type=int, default=12, help="operators listed by self time")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # the model folder, in the worker
    return parser.parse_args()


def kind_of(name: str) -> str:
    return next((kind for kind, prefixes in KINDS.items() if name.startswith(prefixes)), "elementwise and other")


class PhaseSampler:
    """The highest resident memory (Linux /proc/self/statm) seen in each phase, sampled from a thread."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.peaks: dict[str, int] = defaultdict(int)
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        with open("/proc/self/statm") as statm:
            while self.running:
                statm.seek(0)
                resident = int(statm.read().split()[1]) * self.page
                if self.phase is not None:
                    self.peaks[self.phase] = max(self.peaks[self.phase], resident)
                time.sleep(0.002)

    def enter(self, phase: str | None) -> None:
        self.phase = phase


def mark_phases(run, enter) -> list:
    """Call `enter(phase)` as a step reaches each phase (hooks on the model and the optimizer); returns the
    hooks' handles."""
    transformer = run.model.transformer
    # The embeddings' inputs are token ids: their backward hooks fire on the outputs' gradients, as wanted.
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                            "to module outputs")
    return [transformer.wte.register_forward_pre_hook(lambda *_: enter(PHASES[0])),
            transformer.ln_f.register_forward_hook(lambda *_: enter(PHASES[1])),
            transformer.ln_f.register_full_backward_pre_hook(lambda *_: enter(PHASES[2])),
            transformer.wte.register_full_backward_pre_hook(lambda *_: enter(PHASES[3])),
            run.optimizer.register_step_pre_hook(lambda *_: enter(PHASES[4]))]


def worker(args: argparse.Namespace) -> None:
    # The step train_step.py times: the same settings, blocks and order.
    side = GPT2KidsSide(argparse.Namespace(folder=args.worker, batch=args.batch, block=args.block, device=args.device,
                                           compile=False), args.precision, args.dropout)
    run = side.run
    steps = iter(range(10**9))

    def step() -> None:
        side.step(next(steps))

    for _ in range(args.warmup):
        step()
    cuda = run.device.type == "cuda"
    peaks: dict[str, int] = {}
    if cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
        for _ in range(args.steps):
            step()
        peaks["step (allocator)"] = torch.cuda.max_memory_allocated(run.device)
    elif Path("/proc/self/statm").is_file():
        sampler = PhaseSampler()
        handles = mark_phases(run, sampler.enter)
        for _ in range(args.steps):
            step()
            sampler.enter(None)
        sampler.running = False
        for handle in handles:
            handle.remove()
        peaks = {phase: sampler.peaks[phase] for phase in PHASES if phase in sampler.peaks}

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profile:
        step()
    events = [event for event in profile.key_averages() if event.self_cpu_time_total > 0]
    total = sum(event.self_cpu_time_total for event in events)
    by_kind: dict[str, float] = defaultdict(float)
    for event in events:
        by_kind[kind_of(event.key)] += event.self_cpu_time_total

    print(f"{args.model_size} model, batch {args.batch} x block {args.block}, {run.precision.name}, dropout "
          f"{args.dropout}, {run.device}: {machine(run.device)}")
    if peaks:
        label = "allocated" if cuda else "resident"
        print(f"\npeak {label} memory by phase, over {args.steps} steps after {args.warmup} warm-up\n")
        print("| phase | GiB |\n| --- | ---: |")
        for phase, peak in peaks.items():
            print(f"| {phase} | {peak / (1 << 30):.2f} |")
    print(f"\none profiled step: {total / 1e6:.2f} s of operator self time ({args.batch * args.block} tokens)\n")
    print("| kind | seconds | share |\n| --- | ---: | ---: |")
    for kind, micros in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"| {kind} | {micros / 1e6:.2f} | {100 * micros / total:.1f}% |")
    print("\n| operator | calls | seconds | share |\n| --- | ---: | ---: | ---: |")
    for event in sorted(events, key=lambda event: -event.self_cpu_time_total)[:args.top]:
        print(f"| {event.key} | {event.count} | {event.self_cpu_time_total / 1e6:.3f} | "
              f"{100 * event.self_cpu_time_total / total:.1f}% |")


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        worker(args)
        return
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory(prefix="gpt2kids-profile-") as work:
        folder = Path(work) / "model"
        make_model_folder(args.model_size, folder)
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", str(folder)], check=True)


if __name__ == "__main__":
    main()
