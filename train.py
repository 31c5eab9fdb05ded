"""python train.py: fine-tune GPT-2 on Indonesian children's stories (see README.md for the flags)."""

from __future__ import annotations

from gpt2kids.errors import ArgumentParser, run_cli
from gpt2kids.trainer import DEFAULT_INIT, TrainConfig, train


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = ArgumentParser(prog="train.py", description=__doc__)
    add = parser.add_argument
    add("--data", help="folder of .txt stories, a .txt of blank-line-separated stories, or a .jsonl "
                       "with a text field (default: the bundled stories)")
    add("--init", default=DEFAULT_INIT, help="hub id, local HF folder, gpt2kids run folder or export, or 'scratch'")
    add("--model-size", default="small", choices=("tiny", "small"), help="preset for --init scratch")
    add("--tokenizer", help="tokenizer.json or a folder with one (default: the init checkpoint's)")
    add("--vocab-size", type=int, default=8000, help="size of a tokenizer trained with --init scratch")
    add("--out", help="run folder (default: runs/<date-time>)")
    add("--epochs", type=int, default=10)
    add("--batch-size", type=int, default=8, help="micro-batch: sequences per forward")
    add("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    add("--block-size", type=int, help="tokens per training sequence (default: min(1024, model context))")
    add("--lr", type=float, default=5e-5, help="peak learning rate")
    add("--schedule", default="linear", choices=("linear", "cosine", "constant"))
    add("--warmup-steps", type=int, default=0)
    add("--weight-decay", type=float, default=0.0, help="applied to 2-D weights only")
    add("--max-grad-norm", type=float, default=1.0, help="0 turns clipping off")
    add("--eval-split", type=float, default=0.1, help="fraction of stories held out")
    add("--eval-data", help="an explicit held-out set (same formats as --data); no split is made then")
    add("--eval-every", type=int, help="also evaluate every N optimizer steps")
    add("--save-every", type=int, help="also checkpoint every N optimizer steps")
    add("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--seed", type=int, default=42)
    add("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add("--max-steps", type=int, help="stop after N optimizer steps (smoke runs)")
    add("--dropout", type=float, help="override the model's dropout rates (default: the checkpoint's)")
    return TrainConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
