"""The run folder (runs/NAME/: train_config.json, TensorBoard events, checkpoint/, best/, final/).

A new run refuses an `--out` that already holds a run, or folders of the names it writes; `--resume`
takes the run's settings from its train_config.json, all but those of the invocation (`SESSION_FIELDS`,
like `--max-steps`).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import typing
from datetime import datetime
from pathlib import Path

from gpt2kids import atomic_files, checkpoint, data
from gpt2kids.distributed import Distributed
from gpt2kids.errors import UserError, say
from gpt2kids.hf import RUN_EXPORTS
from gpt2kids.train_config import SESSION_FIELDS, TRAIN_CONFIG, TrainConfig


def make_inputs_absolute(config: TrainConfig) -> None:
    """The local paths among the inputs, made absolute (in place): a run resumes from any folder, and a
    local --init like owner/name is never taken for a hub id later."""
    for name in ("data", "eval_data", "tokenizer", "init"):
        value = getattr(config, name)
        if value and value != "scratch" and Path(value).expanduser().exists():
            setattr(config, name, str(Path(value).expanduser().resolve()))


def prepare(config: TrainConfig, dist: Distributed) -> tuple[TrainConfig, Path]:
    """Resolve `--out`, refuse to overwrite a run, and on `--resume` restore the run's own settings."""
    make_inputs_absolute(config)
    name = dist.broadcast(datetime.now().strftime("%Y%m%d-%H%M%S"))
    out = Path(config.out) if config.out else Path("runs") / name
    has_run = (out / TRAIN_CONFIG).is_file() or checkpoint.exists(out)
    if config.resume:
        if not has_run:
            raise UserError(f"nothing to resume in {out}: it holds no run; drop --resume to start a new run")
        if not checkpoint.exists(out) and (out / "final").is_dir():  # a run killed before its first has no final/
            raise UserError(f"nothing to resume in {out}: the run has finished and holds no checkpoint "
                            "(--drop-resume-state); start a new run with another --out")
        restored = read_settings(out, "the run cannot be resumed")
        check_stories_in_place(restored, out)  # said before the note below, which would name --data as ignored
        ignored = config.differences(restored)
        if ignored:
            say(f"note: {', '.join(ignored)} ignored: a resumed run keeps the settings in {out / TRAIN_CONFIG}; "
                "start a new run (another --out) to change them")
        for setting in SESSION_FIELDS:
            setattr(restored, setting, getattr(config, setting))
        restored.out = str(out)
        restored.validate()
        config = restored
    elif has_run:
        raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    elif taken := [f"{name}/" if (out / name).is_dir() else name
                   for name in (*RUN_EXPORTS, checkpoint.CHECKPOINT, checkpoint.PREVIOUS, checkpoint.DAMAGED)
                   if (out / name).exists()]:  # a folder of the user's that the run would replace with its own
        raise UserError(f"{out} holds {' and '.join(taken)} but no run (no {TRAIN_CONFIG}), and a new run would "
                        "replace them; choose another --out, or move them away")
    if dist.is_main:
        atomic_files.check_writable(out)
        if out.is_dir():  # what a killed run may have left half-done
            atomic_files.remove_debris(out)
            for export in RUN_EXPORTS:
                atomic_files.recover_folder(out / export)
    return config, out


def resume_command(folder: Path, processes: int) -> str:
    """The command that continues the run in `folder`: with the process count it was trained with."""
    launcher = f"torchrun --nproc_per_node={processes}" if processes > 1 else "python"
    return f"{launcher} train.py --out {shlex.quote(str(folder))} --resume"  # quoted: a path may hold spaces


def check_stories_in_place(settings: TrainConfig, folder: Path) -> None:
    """Refuse, saying how to mend it, a run whose stories are no longer where its train_config.json says; and
    make the paths there absolute (one written by hand may start with ~)."""
    for name, what in (("data", "stories"), ("eval_data", "held-out stories")):
        value = getattr(settings, name)
        if value and not Path(value).expanduser().exists():
            raise UserError(f"the run in {folder} read its {what} from {value}, which does not exist now; put them "
                            f"back there, or write where they are now (an absolute path) as \"{name}\" in "
                            f"{folder / TRAIN_CONFIG}")
    make_inputs_absolute(settings)


def held_out_stories(folder: Path) -> list[str]:
    """The stories a run held out for evaluation, chosen again from its train_config.json (same data, seed)."""
    config = read_settings(folder, "pass the held-out texts as --data")
    check_stories_in_place(config, folder)
    _, held_out = data.load_split(config.data or data.BUNDLED_STORIES, config.eval_data, config.eval_split,
                                  config.seed)
    if not held_out:
        raise UserError(f"the run in {folder} held out no stories (--eval-split 0); pass texts as --data")
    return held_out


def read_settings(folder: Path, otherwise: str) -> TrainConfig:
    """The settings in the run's train_config.json; `otherwise` says what to do when it cannot be read."""
    types = typing.get_type_hints(TrainConfig)
    try:
        saved = json.loads((folder / TRAIN_CONFIG).read_text())
        settings = {key: value for key, value in saved.items() if key in types}  # a newer version's: left out
        for key, value in settings.items():  # a hand-edited "8" would fail later, in a comparison, as a traceback
            allowed = typing.get_args(types[key]) or (types[key],)
            allowed += (int,) if float in allowed else ()
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise TypeError(f"{key} is {value!r}, not {' or '.join(kind.__name__ for kind in allowed)}")
        return TrainConfig(**settings)
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise UserError(f"{folder / TRAIN_CONFIG} cannot be read ({error}); {otherwise}") from None


def write_settings(folder: Path, config: TrainConfig) -> None:
    """Create the run folder with its `train_config.json` (only once every input has been checked)."""
    text = json.dumps(dataclasses.asdict(config), indent=2) + "\n"
    try:
        atomic_files.atomic_write_text(folder / TRAIN_CONFIG, text)
    except OSError as error:
        raise UserError(atomic_files.describe_os_error(error, folder)) from None


def human_size(size: float) -> str:
    for unit in ("bytes", "KB", "MB"):
        if round(size, 1) < 1000:  # 999,950 bytes is "1.0 MB", not "1000.0 KB"
            return f"{size:.0f} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def drop_resume_state(folder: Path) -> None:
    """Delete the checkpoints of a finished run; the exports stay."""
    for name in (checkpoint.CHECKPOINT, checkpoint.PREVIOUS):
        shutil.rmtree(folder / name, ignore_errors=True)
