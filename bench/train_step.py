"""Optimizer steps/s, tokens/s, peak memory and MFU: gpt2kids' training step against transformers.

Both sides start from the same random-init HF folder (GPT-2 Small shapes, or `--model-size tiny`)
and train on the same blocks of the bundled stories, in the same order:

- gpt2kids: `prepare_run` + `optimizer_step`, dropout 0, constant lr 5e-5, clip 1.0;
- transformers: `GPT2LMHeadModel` in a plain loop with the same settings: dropout 0, the same
  precision (torch.autocast), fused AdamW (lr 5e-5, no weight decay), clip 1.0, `labels=`;
- with `--hf-defaults`, also transformers with dropout 0.1 in fp32 (what the HF Trainer runs by default);
- with `--gpt2kids-dropout`, also gpt2kids with dropout 0.1 (what train.py keeps when fine-tuning GPT-2).

Each side lives in its own worker process, so its peak memory (ru_maxrss on CPU,
max_memory_allocated on CUDA) is its own. The parent sends "step" to the workers in turn, so the
sides alternate step by step under the same machine conditions; only one computes at a time.
Warm-up steps are excluded and medians reported. The first step's losses are printed: with the same
weights and data they must agree, which shows both sides compute the same thing.

On a shared CPU another process can steal cores mid-step. The parent reads /proc/stat around every
step: CPU time spent outside the stepping worker (other processes, hypervisor steal) above
`--max-foreign` of the machine's capacity marks the step as disturbed: it is not timed, and every
side runs extra rounds (up to 6) until each has --steps undisturbed ones, so all sides still take the
same steps on the same blocks and their losses compare step by step.

`--malloc tuned` runs every worker with glibc's mmap and trim thresholds raised (the environment
variables MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_), so freed activation memory is reused
instead of being returned to the OS and page-faulted back in on the next step.

    python bench/train_step.py [--model-size small|tiny] [--batch 4] [--block 512] [--precision auto]
                               [--steps 5] [--warmup 2] [--hf-defaults] [--gpt2kids-dropout] [--compile]
                               [--device auto] [--malloc default|tuned]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import torch
from benchutil import (
    ROOT,
    SEED,
    FlopModel,
    foreign_share,
    gib,
    machine,
    machine_busy_seconds,
    make_model_folder,
    matmul_peak,
    report,
    synchronize,
)

from gpt2kids import data
from gpt2kids.config import GPT2Config
from gpt2kids.device import choose_precision, resolve_device

LR = 5e-5
MAX_EXTRA_ROUNDS = 6  # rounds run beyond --steps to replace steps disturbed by other work
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAX_GRAD_NORM = 1.0
# Environment for the workers. "tuned": big blocks stay in the process after free (values are bytes).
MALLOC = {"default": {}, "tuned": {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}}
# name -> (library, dropout, precision override)
SIDES = {
    "gpt2kids": ("gpt2kids", 0.0, None),
    "transformers": ("transformers", 0.0, None),
    "transformers-defaults": ("transformers", 0.1, "fp32"),
    "gpt2kids-dropout": ("gpt2kids", 0.1, None),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", default="small", choices=("small", "tiny"))
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--block", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per side first")
    parser.add_argument("--hf-defaults", action="store_true",
                        help="also run transformers with dropout 0.1 in fp32 (the Trainer-like defaults)")
    parser.add_argument("--gpt2kids-dropout", action="store_true",
                        help="also run gpt2kids with dropout 0.1 (what train.py keeps when fine-tuning GPT-2)")
    parser.add_argument("--malloc", default="default", choices=tuple(MALLOC),
                        help="glibc allocator settings for every worker (see above)")
    parser.add_argument("--max-foreign", type=float, default=0.1,
                        help="leave a step untimed when other work used more than this fraction of the CPUs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=tuple(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- workers: one side each ----------------------------------------------------------------------

def full_steps(blocks: int, batch: int) -> int:
    """The steps of an epoch that hold a whole batch: the last, shorter one is never taken, since tokens/s
    counts batch x block tokens for every timed step."""
    return max(blocks // batch, 1)


class GPT2KidsSide:
    """gpt2kids' own loop: exactly what `python train.py` runs per step."""

    def __init__(self, args: argparse.Namespace, precision: str, dropout: float) -> None:
        from gpt2kids.train_config import TrainConfig
        from gpt2kids.training import optimizer_step, prepare_run

        # A run folder per side: the dropout side's would otherwise find the other's run there and refuse it.
        out = args.folder.parent / f"gpt2kids-run-dropout-{dropout}"
        config = TrainConfig(init=str(args.folder), out=str(out), epochs=1,
                             batch_size=args.batch, block_size=args.block, lr=LR, schedule="constant",
                             max_grad_norm=MAX_GRAD_NORM, precision=precision, device=args.device,
                             compile=args.compile, seed=SEED, dropout=dropout)
        self.run = prepare_run(config)
        self.run.model.train()
        self.device = self.run.device
        self.order = data.epoch_order(len(self.run.dataset.train), SEED, 0)
        self.optimizer_step = optimizer_step

    def step(self, index: int) -> float:
        step = index % full_steps(len(self.run.dataset.train), self.run.config.batch_size)
        return self.optimizer_step(self.run, self.run.plan.step_blocks(self.order, step)).loss


class TransformersSide:
    """`GPT2LMHeadModel` in the plainest fast loop: autocast forward, backward, clip, fused AdamW."""

    def __init__(self, args: argparse.Namespace, precision: str, dropout: float) -> None:
        from transformers import GPT2LMHeadModel

        from gpt2kids.tokenizer import Tokenizer

        self.device = resolve_device(args.device)
        self.precision = choose_precision(precision, self.device)
        rates = dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        self.model = GPT2LMHeadModel.from_pretrained(args.folder, dtype=torch.float32, **rates).to(self.device)
        self.model.train()
        if args.compile:
            self.model = torch.compile(self.model)
        # Fused AdamW, as gpt2kids uses where it exists (CPU and CUDA).
        fused = dict(fused=True) if self.device.type in ("cpu", "cuda") else dict(foreach=True)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0, **fused)
        # The very blocks gpt2kids trains on: same split, same packing, same order.
        train_stories, eval_stories = data.load_split(data.BUNDLED_STORIES, None, 0.1, SEED)
        blocks = data.build_dataset(train_stories, eval_stories, Tokenizer.from_path(args.folder), args.block).train
        self.inputs = blocks.inputs
        # HF shifts labels inside the loss; gpt2kids' targets are already the next tokens.
        self.labels = torch.full_like(blocks.inputs, data.IGNORE_INDEX)
        self.labels[:, 1:] = blocks.targets[:, :-1]
        self.plan = data.StepPlan(len(blocks), args.batch, 1)
        self.order = data.epoch_order(len(blocks), SEED, 0)

    def step(self, index: int) -> float:
        [indices] = self.plan.step_blocks(self.order, index % full_steps(len(self.inputs), self.plan.batch_size))
        inputs, labels = self.inputs[indices].to(self.device), self.labels[indices].to(self.device)
        with self.precision.autocast(self.device):
            loss = self.model(input_ids=inputs, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def worker(args: argparse.Namespace) -> None:
    """Build one side, then answer the parent's commands on stdin with one JSON line each on stdout."""
    library, dropout, precision_override = SIDES[args.worker]
    precision = precision_override or args.precision
    reply = sys.stdout
    sys.stdout = sys.stderr  # anything the libraries print stays off the protocol channel
    side = (GPT2KidsSide if library == "gpt2kids" else TransformersSide)(args, precision, dropout)
    device = side.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    answer(reply, {"ready": True, "precision": choose_precision(precision, device).name,
                   "threads": torch.get_num_threads()})
    index = 0
    for line in sys.stdin:
        if line.strip() == "step":
            synchronize(device)
            cpu_before = cpu_seconds()
            start = time.perf_counter()
            loss = side.step(index)
            synchronize(device)
            answer(reply, {"seconds": time.perf_counter() - start, "loss": loss,
                           "cpu_seconds": cpu_seconds() - cpu_before})
            index += 1
        else:
            # ru_maxrss is in KiB on Linux: the most this process ever held, model and optimizer included.
            peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            answer(reply, {"peak_bytes": peak})
            return


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def answer(stream: IO[str], message: dict[str, Any]) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


# --- the parent: alternate the workers, then report ----------------------------------------------

class Worker:
    def __init__(self, name: str, args: argparse.Namespace, folder: Path, env: dict[str, str]) -> None:
        self.name = name
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--folder", str(folder),
                   "--model-size", args.model_size, "--batch", str(args.batch), "--block", str(args.block),
                   "--precision", args.precision, "--device", args.device]
        if args.compile:
            command.append("--compile")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info: dict[str, Any] = {}
        self.seconds: list[float] = []
        self.cpu_share: list[float] = []  # CPU seconds used / (wall seconds x threads), per measured step
        self.losses: list[float] = []
        self.disturbed = 0
        self.disturbed_seconds: list[float] = []

    def request(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.receive()

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.name} worker died (exit status {self.process.wait()}); see its stderr above")
        return json.loads(line)


def step_and_watch(w: Worker) -> tuple[dict[str, Any], float | None]:
    """One step of one worker, and the fraction of the machine's CPUs other work used meanwhile."""
    busy_before, start = machine_busy_seconds(), time.perf_counter()
    result = w.request("step")
    busy_after, wall = machine_busy_seconds(), time.perf_counter() - start
    return result, foreign_share(busy_before, busy_after, result["cpu_seconds"], wall)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    names = (["gpt2kids", "transformers"] + (["transformers-defaults"] if args.hf_defaults else [])
             + (["gpt2kids-dropout"] if args.gpt2kids_dropout else []))
    with tempfile.TemporaryDirectory(prefix="gpt2kids-bench-") as temporary:
        folder = Path(temporary) / "model"
        config = make_model_folder(args.model_size, folder)
        if args.block > config.n_positions:
            raise SystemExit(f"--block {args.block} exceeds the model's context of {config.n_positions}")
        # A private token cache: the benchmark leaves nothing in ~/.cache.
        env = {**os.environ, "GPT2KIDS_CACHE": str(Path(temporary) / "cache"), "PYTHONPATH": str(ROOT),
               **MALLOC[args.malloc]}
        workers = [Worker(name, args, folder, env) for name in names]
        try:
            for w in workers:
                w.info = w.receive()
                if w.info["precision"] not in DTYPES:  # auto on a GPU without fast bf16
                    raise SystemExit(f"{w.name} chose {w.info['precision']}, which this benchmark does not compare "
                                     "(transformers' side would need a grad scaler); pass --precision bf16 or fp32")
            # The roof for MFU, timed while every worker is idle, before and after the steps; the best counts.
            peaks = {name: matmul_peak(DTYPES[name], device) for name in {w.info["precision"] for w in workers}}
            # Every side takes the same steps on the same blocks, so their losses stay comparable step by
            # step. A step disturbed by other work is not timed; extra rounds (all sides) make up for it.
            rounds = 0
            while True:
                # Rotate who goes first so no side always runs right after the same other one.
                shift = rounds % len(workers)
                for w in workers[shift:] + workers[:shift]:
                    result, foreign = step_and_watch(w)
                    w.losses.append(result["loss"])
                    note = f", {foreign:.0%} of the CPUs busy elsewhere" if foreign is not None else ""
                    print(f"step {rounds + 1} {w.name}: {result['seconds']:.2f} s, "
                          f"loss {result['loss']:.4f}{note}", file=sys.stderr)
                    if rounds < args.warmup:
                        continue
                    if foreign is None or foreign <= args.max_foreign:
                        w.seconds.append(result["seconds"])
                        w.cpu_share.append(result["cpu_seconds"] / result["seconds"] / w.info["threads"])
                    else:
                        w.disturbed += 1
                        w.disturbed_seconds.append(result["seconds"])
                        print("  disturbed by other work: not timed", file=sys.stderr)
                rounds += 1
                planned = args.warmup + args.steps
                enough = all(len(w.seconds) >= args.steps for w in workers)
                if rounds >= planned and (enough or rounds >= planned + MAX_EXTRA_ROUNDS):
                    break
            for w in workers:
                if not w.seconds:  # never undisturbed: time what there is, and say so through "disturbed"
                    w.seconds = w.disturbed_seconds
                    w.cpu_share = [float("nan")]
            peaks = {name: max(flops, matmul_peak(DTYPES[name], device)) for name, flops in peaks.items()}
            for w in workers:
                w.info.update(w.request("done"))
                w.process.wait()
        finally:
            for w in workers:
                if w.process.poll() is None:
                    w.process.kill()
    return summarise(args, config, device, workers, peaks)


def summarise(args: argparse.Namespace, config: GPT2Config, device: torch.device, workers: list[Worker],
              peaks: dict[str, float]) -> dict[str, Any]:
    tokens = args.batch * args.block
    flops_per_token = FlopModel.of(config).per_token(args.block)
    rows = []
    for w in workers:
        median = statistics.median(w.seconds)
        rows.append({
            "side": w.name, "precision": w.info["precision"], "dropout": SIDES[w.name][1],
            "step_s": median, "steps_per_s": 1 / median, "tokens_per_s": tokens / median,
            "peak_bytes": w.info["peak_bytes"], "mfu": tokens * flops_per_token / median / peaks[w.info["precision"]],
            # Every side took the same number of steps on the same blocks: the losses compare step by step.
            "first_loss": w.losses[0], "last_loss": w.losses[-1],
            "step_seconds": w.seconds,
            "cpu_share": statistics.mean(w.cpu_share), "disturbed_steps": w.disturbed,
        })
    return {"machine": machine(device), "device": str(device), "model_size": args.model_size,
            "batch": args.batch, "block": args.block, "compile": args.compile, "malloc": args.malloc,
            "steps": args.steps, "rounds": len(workers[0].losses),
            "warmup": args.warmup, "flops_per_token": flops_per_token,
            "matmul_peak_flops": peaks, "rows": rows}


def table(results: dict[str, Any]) -> str:
    rows = results["rows"]
    reference = next(r for r in rows if r["side"] == "transformers")
    memory = "peak CUDA memory" if results["device"].startswith("cuda") else "peak RSS"
    options = "".join([", torch.compile" if results["compile"] else "",
                       ", malloc tuned" if results["malloc"] == "tuned" else ""])
    lines = [
        f"{results['model_size']} model, batch {results['batch']} x block {results['block']}{options}, "
        f"{results['device']}: {results['machine']}",
        f"medians of {results['steps']} steps after {results['warmup']} warm-up; "
        f"{results['flops_per_token'] / 1e6:.0f} MFLOP per token; matmul peak "
        + ", ".join(f"{name} {flops / 1e9:.0f} GFLOP/s" for name, flops in results["matmul_peak_flops"].items()),
        "",
        f"| side | precision | dropout | s/step | steps/s | tokens/s | vs transformers | {memory} | vs transformers "
        f"| MFU | CPU share | disturbed | loss, step 1 | loss, step {results['rounds']} |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['side']} | {r['precision']} | {r['dropout']} | {r['step_s']:.2f} | {r['steps_per_s']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / reference['tokens_per_s']:.2f}x | "
            f"{gib(r['peak_bytes'])} | {r['peak_bytes'] / reference['peak_bytes']:.2f}x | {r['mfu']:.1%} | "
            f"{r['cpu_share']:.0%} | {r['disturbed_steps']} | {r['first_loss']:.4f} | {r['last_loss']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    if min(args.batch, args.block, args.steps) < 1 or args.warmup < 0:
        raise SystemExit("--batch, --block and --steps must be positive, --warmup >= 0")
    results = run(args)
    report(results, args.json, table(results))


if __name__ == "__main__":
    main()
