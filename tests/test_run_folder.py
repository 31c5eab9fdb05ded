"""The run folder: a resumed run's settings, the size line, dropping the resume state."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import config_for

from gpt2kids import run_folder
from gpt2kids.distributed import Distributed
from gpt2kids.errors import UserError
from gpt2kids.training import train


def test_resume_names_the_flags_it_ignores(tmp_path, init_folder, corpus, capsys):
    out = tmp_path / "run"
    train(config_for(init_folder, corpus, out, max_steps=2))
    capsys.readouterr()
    # Changed: --epochs and --lr; the same as saved: --batch-size; a setting of the session: --max-steps.
    config, _ = run_folder.prepare(config_for(init_folder, corpus, out, resume=True, epochs=5, lr=5e-3,
                                              max_steps=4), Distributed())
    line = capsys.readouterr().err
    assert "--epochs, --lr ignored: a resumed run keeps the settings in" in line, line
    assert "--batch-size" not in line and "--max-steps" not in line
    assert (config.epochs, config.lr, config.max_steps) == (2, 1e-3, 4)


def test_resume_names_a_flag_given_at_its_default_value(tmp_path, init_folder, corpus, capsys):
    from gpt2kids.train_config import TrainConfig, parse_args

    out = tmp_path / "run"
    train(config_for(init_folder, corpus, out, max_steps=2))  # its --lr: 1e-3
    capsys.readouterr()
    config = parse_args(["--out", str(out), "--resume", "--lr", str(TrainConfig().lr), "--epochs", "2"])
    run_folder.prepare(config, Distributed())
    line = capsys.readouterr().err
    assert "--lr ignored: a resumed run keeps the settings in" in line, line  # --epochs 2 is the run's own


def test_nothing_is_said_when_resume_changes_nothing(tmp_path, init_folder, corpus, capsys):
    out = tmp_path / "run"
    train(config_for(init_folder, corpus, out, max_steps=2))
    capsys.readouterr()
    run_folder.prepare(config_for(init_folder, corpus, out, resume=True), Distributed())
    assert "ignored" not in capsys.readouterr().err


def test_exports_and_checkpoints_are_readable_like_any_other_file(tmp_path, init_folder, corpus):
    out = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        train(config_for(init_folder, corpus, out, epochs=1))
    finally:
        os.umask(previous)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_drop_resume_state_keeps_only_the_exports(tmp_path, init_folder, corpus, monkeypatch):
    real_drop, held = run_folder.drop_resume_state, []

    def drop(folder):  # what there was to drop: the second epoch's checkpoint moved the first one aside
        held.extend(name for name in ("checkpoint", "checkpoint-previous") if (folder / name).is_dir())
        real_drop(folder)

    monkeypatch.setattr(run_folder, "drop_resume_state", drop)
    out = tmp_path / "run"
    train(config_for(init_folder, corpus, out, epochs=2, drop_resume_state=True))
    assert held == ["checkpoint", "checkpoint-previous"]
    assert (out / "best" / "model.safetensors").is_file() and (out / "final" / "model.safetensors").is_file()
    assert not (out / "checkpoint").exists() and not (out / "checkpoint-previous").exists()
    with pytest.raises(UserError, match="nothing to resume|holds no checkpoint"):
        train(config_for(init_folder, corpus, out, resume=True))


def test_human_size():
    assert run_folder.human_size(999) == "999 bytes"
    assert run_folder.human_size(3_800_000_000) == "3.8 GB"
    assert run_folder.human_size(512_300) == "512.3 KB"
    assert run_folder.human_size(999_950) == "1.0 MB"  # rounding up moves to the next unit
    assert run_folder.human_size(999_960_000) == "1.0 GB"


def test_the_resume_command_names_the_process_count_the_run_was_trained_with():
    from pathlib import Path

    assert run_folder.resume_command(Path("runs/a"), 1) == "python train.py --out runs/a --resume"
    assert run_folder.resume_command(Path("runs/a"), 2) == "torchrun --nproc_per_node=2 train.py --out runs/a --resume"
