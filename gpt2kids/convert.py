"""`python -m gpt2kids.convert SPEC OUTDIR`: any GPT-2 checkpoint -> a clean HF-format folder."""

from __future__ import annotations

from gpt2kids.cli import quiet_interrupt_while_starting

if __name__ == "__main__":  # python -m gpt2kids.convert
    quiet_interrupt_while_starting()  # before torch's import

import sys
from pathlib import Path

from gpt2kids.atomic_files import read_json_object
from gpt2kids.cli import ArgumentParser, run_cli
from gpt2kids.errors import UserError, warn
from gpt2kids.hf import export, load_model, load_tokenizer
from gpt2kids.tokenizer import tokenizer_files_in


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m gpt2kids.convert", description=__doc__)
    parser.add_argument("spec", help="hub id, HF folder, pytorch_model.bin, sharded or prefix-less save")
    parser.add_argument("out_dir", type=Path, help="folder to write (config.json, model.safetensors, tokenizer)")
    args = parser.parse_args(argv)
    # Before loading, which for a hub id may download half a gigabyte.
    if args.out_dir.exists() and (not args.out_dir.is_dir() or any(args.out_dir.iterdir())):
        raise UserError(f"{args.out_dir} already exists and is not an empty folder; choose a new output folder")
    model, folder = load_model(args.spec, dtype=None)  # a clean copy: the weights keep their dtype
    tokenizer = load_tokenizer(folder) if tokenizer_files_in(folder) else None
    if tokenizer is None:
        warn(f"{folder} has no tokenizer files; the export holds weights and config only")
    # The source's generation_config.json kept as it is (None: there is none, and export writes its own).
    generation = read_json_object(folder / "generation_config.json", "fix or delete it, then convert again")
    export(model, tokenizer, args.out_dir, generation=generation)
    print(f"wrote {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
