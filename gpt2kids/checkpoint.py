"""Training checkpoints: everything needed to resume exactly, written atomically, checksummed.

`RUN/checkpoint/` holds
  model.safetensors   the weights (gpt2kids names; the tied lm_head is left out)
  state.pt            optimizer, scheduler, scaler, each process's RNG states, progress, and what the run
                      must match to resume (process count, corpus digest, model config, tokenizer);
                      read with `weights_only=True`
  progress.json       the progress, for people
  manifest.json       SHA-256 of each file above, written last
The checkpoint it replaces stays as `RUN/checkpoint-previous/`, so a kill at any instant, or a damaged
file, still leaves one good checkpoint to resume from.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2kids.atomic_files import describe_os_error, replace_folder
from gpt2kids.errors import UserError, warn
from gpt2kids.hf import load_plain_pickle, refused_global
from gpt2kids.model import GPT2

CHECKPOINT = "checkpoint"
PREVIOUS = "checkpoint-previous"
DAMAGED = "checkpoint-damaged"  # where a damaged checkpoint/ goes once a resume has fallen back past it
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "state.pt", "progress.json")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksums(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """SHA-256 of each named file, side by side (hashlib lets other threads run while it hashes)."""
    names = list(names)
    with ThreadPoolExecutor() as pool:
        return dict(zip(names, pool.map(sha256_of, [folder / name for name in names]), strict=True))


def rng_states() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]
    state: dict[str, Any]  # state.pt's dict (see the module docstring; `save_checkpoint` in training.py)
    folder: Path

    @property
    def progress(self) -> dict[str, Any]:
        return self.state["progress"]


def newest_folder(run_dir: Path) -> Path | None:
    """The newest checkpoint folder, not verified: checkpoint/, else checkpoint-previous/ (after a resume fell back
    and set a damaged checkpoint/ aside), else None."""
    return next((run_dir / name for name in (CHECKPOINT, PREVIOUS) if (run_dir / name).is_dir()), None)


def save(run_dir: Path, model: GPT2, state: dict[str, Any]) -> None:
    """Write `run_dir/checkpoint/` atomically; `state` must hold a `progress` dict."""

    def fill(folder: Path) -> None:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.untied_state_dict().items()}
        save_file(weights, folder / "model.safetensors")
        with open(folder / "state.pt", "wb") as handle:  # a Python file: a failed write shows as its OSError
            torch.save(state, handle)
        (folder / "progress.json").write_text(json.dumps(state["progress"], indent=2) + "\n")
        manifest = checksums(folder, FILES)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    newest = newest_folder(run_dir)
    kept = f"the last checkpoint ({newest}/) is untouched" if newest else "no checkpoint was written"
    try:
        replace_folder(run_dir / CHECKPOINT, fill, previous=run_dir / PREVIOUS)
    except OSError as error:
        raise UserError(f"{describe_os_error(error, run_dir / CHECKPOINT)}; {kept}") from None


def damage_in(folder: Path) -> str | None:
    """None if the checkpoint in `folder` is complete and matches its manifest, else what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return f"{folder / MANIFEST} is missing (the checkpoint was never completed)"
    except (OSError, ValueError):
        return f"{folder / MANIFEST} is damaged"
    if not isinstance(manifest, dict):
        return f"{folder / MANIFEST} is damaged"
    unlisted = [name for name in FILES if name not in manifest]
    if unlisted:  # a manifest that parses but vouches for less than a checkpoint holds
        return f"{folder / MANIFEST} does not list {unlisted[0]}"
    missing = [folder / name for name in manifest if not (folder / name).is_file()]
    if missing:
        return f"{missing[0]} is missing"
    actual = checksums(folder, manifest)
    for name, expected in manifest.items():
        if actual[name] != expected:
            return f"{folder / name} is damaged (its checksum does not match the manifest)"
    return None


def _read(folder: Path) -> Checkpoint:
    try:
        model = load_file(folder / "model.safetensors")
        state = load_plain_pickle(folder / "state.pt")
    except pickle.UnpicklingError as error:  # torch's own text goes on to say how to load it unsafely: not passed on
        refused = refused_global(error)
        if refused:
            raise UserError(f"{folder / 'state.pt'} asks to run code when unpickled ({refused}), so it was not "
                            "loaded; resume only checkpoints gpt2kids wrote") from None
        raise UserError(f"cannot read the checkpoint in {folder} (its state.pt is not a state file gpt2kids "
                        "wrote)") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read the checkpoint in {folder} ({first})") from None
    return Checkpoint(model, state, folder)


def exists(run_dir: Path) -> bool:
    return newest_folder(run_dir) is not None


def set_aside_damaged(run_dir: Path) -> None:
    """Move a damaged checkpoint/ out of the rotation (to checkpoint-damaged/), after a resume fell back to
    checkpoint-previous/: the next save would otherwise push the good one out and keep the damaged one."""
    damaged = run_dir / DAMAGED
    if damaged.exists():
        shutil.rmtree(damaged)
    os.replace(run_dir / CHECKPOINT, damaged)


def load_latest_good(run_dir: Path) -> Checkpoint:
    """The newest checkpoint that verifies; says on stderr when it had to fall back."""
    problems = []
    for folder in (run_dir / CHECKPOINT, run_dir / PREVIOUS):
        if not folder.is_dir():
            continue
        problem = damage_in(folder)
        if problem is None:
            if problems:
                warn(f"{problems[0]}; resuming from the previous checkpoint {folder}")
            return _read(folder)
        problems.append(problem)
    if problems:
        raise UserError(f"no usable checkpoint in {run_dir}: {'; '.join(problems)}; start a new run with "
                        "another --out")
    raise UserError(f"nothing to resume in {run_dir}: it holds no checkpoint; drop --resume to start a new run")
