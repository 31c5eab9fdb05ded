"""Wall time of one epoch: `python train.py` against the Hugging Face `Trainer` with its defaults.

Both start from the same random-init HF folder (GPT-2 Small shapes, or `--model-size tiny`, with
GPT-2's dropout of 0.1 in its config and a BPE trained on the bundled stories) and train one epoch
on the same blocks: the bundled stories, split and packed by gpt2kids (`--eval-split` held out,
seed 42, `--block` tokens per block), `--batch` blocks per step.

- gpt2kids: `python train.py --init FOLDER --epochs 1 --out TMP --batch-size B --block-size T
  --eval-split X` and otherwise its defaults (precision auto: bf16 on a CPU with AVX512-BF16 or AMX);
  at the end of the epoch it evaluates, writes a sample to TensorBoard, exports and checkpoints.
- transformers: `Trainer` with default `TrainingArguments` except `num_train_epochs=1`, the batch
  size, `report_to=[]`, `save_strategy="no"` and, when stories are held out, `eval_strategy="epoch"`
  so it evaluates the same blocks once at the end as train.py does. Its defaults mean fp32 and the
  config's dropout; `--hf-bf16` adds `bf16=True`.

Each runs in its own process; reported are the process's wall time (start to exit: imports, data,
model loading, the epoch, evaluation and whatever each saves), the epoch itself as each tool times it
(train.py's "time: the loop took N s" line: the epoch's optimizer steps, its end-of-epoch evaluation and
sample, the exports and the checkpoint; the "epoch 1/1 ... (N s" line times the steps alone. The Trainer's
`train_runtime`, which includes its evaluation and, with save_strategy "no", saves nothing), peak RSS
(ru_maxrss of the child) and the CPU time other processes took meanwhile.

    python bench/train_epoch.py [--model-size small|tiny] [--batch 4] [--block 512] [--eval-split 0.1]
                                [--repeats 1] [--hf-bf16] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchutil import ROOT, SEED, foreign_share, gib, machine, machine_busy_seconds, make_model_folder, report

from gpt2kids import data
from gpt2kids.device import resolve_device

EPOCH_LINE = re.compile(r"epoch 1/1: train loss ([\d.]+)(?:, eval loss ([\d.]+))?.*\((\d+) s, step (\d+)\)")
LOOP_LINE = re.compile(r"time: the loop took ([\d.]+) s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", default="small", choices=("small", "tiny"))
    parser.add_argument("--batch", type=int, default=4, help="blocks per optimizer step")
    parser.add_argument("--block", type=int, default=512, help="tokens per block")
    parser.add_argument("--eval-split", type=float, default=0.1, help="fraction of stories held out (0: none)")
    parser.add_argument("--repeats", type=int, default=1, help="epochs per side, alternating; medians reported")
    parser.add_argument("--hf-bf16", action="store_true", help="give the Trainer bf16=True (not a default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--hf-child", type=Path, help=argparse.SUPPRESS)  # internal: the Trainer's own process
    return parser.parse_args(argv)


# --- the Trainer's process -----------------------------------------------------------------------

class BlockDataset(torch.utils.data.Dataset):
    """gpt2kids' packed blocks as the dicts the Trainer's default collator stacks."""

    def __init__(self, blocks: data.Blocks) -> None:
        self.inputs = blocks.inputs
        # HF shifts labels inside the loss; gpt2kids' targets are already the next tokens.
        self.labels = torch.full_like(blocks.inputs, data.IGNORE_INDEX)
        self.labels[:, 1:] = blocks.targets[:, :-1]

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.inputs[index], "labels": self.labels[index]}


def hf_child(args: argparse.Namespace) -> None:
    """Train one epoch with the HF Trainer; print one JSON line of results on stdout."""
    from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

    from gpt2kids.tokenizer import Tokenizer

    folder = args.hf_child
    train_stories, eval_stories = data.load_split(data.BUNDLED_STORIES, None, args.eval_split, SEED)
    dataset = data.build_dataset(train_stories, eval_stories, Tokenizer.from_path(folder), args.block)
    model = GPT2LMHeadModel.from_pretrained(folder)
    settings: dict[str, Any] = dict(
        output_dir=str(folder.parent / "hf-trainer"), num_train_epochs=1, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch, report_to=[], save_strategy="no", seed=SEED,
        eval_strategy="epoch" if dataset.eval is not None else "no")
    if args.hf_bf16:
        settings["bf16"] = True
    if resolve_device(args.device).type == "cpu":
        settings["use_cpu"] = True
    trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=BlockDataset(dataset.train),
                      eval_dataset=BlockDataset(dataset.eval) if dataset.eval is not None else None)
    output = trainer.train()
    eval_losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    print(json.dumps({"epoch_s": output.metrics["train_runtime"], "train_loss": output.training_loss,
                      "eval_loss": eval_losses[-1] if eval_losses else None, "steps": output.global_step,
                      "blocks": len(dataset.train)}))


# --- the parent ----------------------------------------------------------------------------------

def run_child(command: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run a process to exit; its wall time, peak RSS, CPU time, and the CPU other work took meanwhile."""
    busy_before, start = machine_busy_seconds(), time.perf_counter()
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
        # wait4 gives this child's own resource usage, peak RSS included.
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    busy_after = machine_busy_seconds()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} ... failed (exit status {process.returncode}):\n"
                         f"{log.with_suffix('.err').read_text()[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    foreign = foreign_share(busy_before, busy_after, cpu, wall)
    return {"wall_s": wall, "peak_bytes": usage.ru_maxrss * 1024, "cpu_s": cpu, "foreign": foreign,
            "stdout": log.with_suffix(".out").read_text(), "stderr": log.with_suffix(".err").read_text()}


def run_gpt2kids(args: argparse.Namespace, folder: Path, out: Path, env: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, "train.py", "--init", str(folder), "--epochs", "1", "--out", str(out),
               "--batch-size", str(args.batch), "--block-size", str(args.block), "--eval-split", str(args.eval_split),
               "--device", args.device]
    result = run_child(command, env, out.parent / out.name)
    match, loop = EPOCH_LINE.search(result["stderr"]), LOOP_LINE.search(result["stderr"])
    if match is None or loop is None:
        raise SystemExit(f"train.py printed no 'epoch 1/1' summary or 'time:' line:\n{result['stderr'][-3000:]}")
    result.update(epoch_s=float(loop.group(1)), train_loss=float(match.group(1)),
                  eval_loss=float(match.group(2)) if match.group(2) else None, steps=int(match.group(4)))
    return result


def run_transformers(args: argparse.Namespace, folder: Path, log: Path, env: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--hf-child", str(folder), "--batch", str(args.batch),
               "--block", str(args.block), "--eval-split", str(args.eval_split), "--device", args.device]
    if args.hf_bf16:
        command.append("--hf-bf16")
    result = run_child(command, env, log)
    result.update(json.loads(result["stdout"].strip().splitlines()[-1]))
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    runs: dict[str, list[dict[str, Any]]] = {"train.py": [], "HF Trainer": []}
    with tempfile.TemporaryDirectory(prefix="gpt2kids-bench-") as temporary:
        work = Path(temporary)
        folder = work / "model"
        config = make_model_folder(args.model_size, folder)
        if args.block > config.n_positions:
            raise SystemExit(f"--block {args.block} exceeds the model's context of {config.n_positions}")
        env = {**os.environ, "GPT2KIDS_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        for repeat in range(args.repeats):
            # Alternate which goes first.
            order = ["train.py", "HF Trainer"] if repeat % 2 == 0 else ["HF Trainer", "train.py"]
            for name in order:
                if name == "train.py":
                    result = run_gpt2kids(args, folder, work / f"run{repeat}", env)
                else:
                    result = run_transformers(args, folder, work / f"hf{repeat}", env)
                print(f"{name}, epoch {repeat + 1}/{args.repeats}: {result['wall_s']:.1f} s in all, epoch "
                      f"{result['epoch_s']:.1f} s, peak RSS {gib(result['peak_bytes'])}", file=sys.stderr)
                runs[name].append({k: v for k, v in result.items() if k not in ("stdout", "stderr")})
    rows = []
    for name, results in runs.items():
        rows.append({"side": name, **{key: statistics.median(r[key] for r in results)
                                      for key in ("wall_s", "epoch_s", "peak_bytes", "cpu_s")},
                     "foreign": max((r["foreign"] or 0.0) for r in results), "steps": results[0]["steps"],
                     "train_loss": results[0]["train_loss"], "eval_loss": results[0]["eval_loss"], "runs": results})
    return {"machine": machine(device), "device": str(device), "model_size": args.model_size, "batch": args.batch,
            "block": args.block, "eval_split": args.eval_split, "repeats": args.repeats, "hf_bf16": args.hf_bf16,
            "rows": rows}


def table(results: dict[str, Any]) -> str:
    ours, theirs = results["rows"]
    trainer = "HF Trainer (bf16=True)" if results["hf_bf16"] else "HF Trainer (defaults: fp32, dropout 0.1)"
    lines = [
        f"one epoch, {results['model_size']} model, batch {results['batch']} x block {results['block']}, "
        f"eval split {results['eval_split']}, {results['device']}: {results['machine']}",
        f"medians of {results['repeats']} run(s) per side",
        "",
        "| side | steps | process wall s | epoch s | peak RSS | train loss | eval loss | CPU busy elsewhere |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        name = "python train.py (precision auto)" if row["side"] == "train.py" else trainer
        eval_loss = f"{row['eval_loss']:.4f}" if row["eval_loss"] is not None else "-"
        lines.append(f"| {name} | {row['steps']} | {row['wall_s']:.1f} | {row['epoch_s']:.1f} | "
                     f"{gib(row['peak_bytes'])} | {row['train_loss']:.4f} | {eval_loss} | {row['foreign']:.0%} |")
    lines += ["", f"train.py is {theirs['wall_s'] / ours['wall_s']:.2f}x faster end to end, "
                  f"{theirs['epoch_s'] / ours['epoch_s']:.2f}x on the epoch itself, "
                  f"and peaks at {ours['peak_bytes'] / theirs['peak_bytes']:.2f}x the Trainer's RSS"]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.hf_child:
        hf_child(args)
        return
    if min(args.batch, args.block, args.repeats) < 1 or not 0 <= args.eval_split < 1:
        raise SystemExit("--batch, --block and --repeats must be positive, --eval-split in [0, 1)")
    results = run(args)
    report(results, args.json, table(results))


if __name__ == "__main__":
    main()
