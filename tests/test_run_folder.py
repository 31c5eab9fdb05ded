"""The run folder: a resumed run's settings, the size line, dropping the resume state."""

from __future__ import annotations

import json
import os
import re
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
    # Changed: --epochs and --lr; the same as saved: --batch-size; settings of the session: --max-steps,
    # --device, --drop-resume-state (taken from this command line, not the run's).
    config, _ = run_folder.prepare(config_for(init_folder, corpus, out, resume=True, epochs=5, lr=5e-3,
                                              max_steps=4, device="auto", drop_resume_state=True), Distributed())
    line = capsys.readouterr().err
    assert "--epochs, --lr ignored: a resumed run keeps the settings in" in line, line
    assert "--batch-size" not in line and "--max-steps" not in line and "--device" not in line
    assert "--drop-resume-state" not in line
    assert (config.epochs, config.lr, config.max_steps) == (2, 1e-3, 4)
    assert config.device == "auto" and config.drop_resume_state


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


def test_resume_puts_back_an_export_left_aside_and_removes_debris_of_killed_writes(tmp_path, init_folder, corpus):
    """What a SIGKILL between the two renames of an export swap, or during an atomic write, leaves behind."""
    from gpt2kids.atomic_files import aside_of

    out = tmp_path / "run"
    train(config_for(init_folder, corpus, out, max_steps=2))
    final = {path.name: path.read_bytes() for path in (out / "final").iterdir()}
    os.replace(out / "final", aside_of(out / "final"))
    (out / ".train_config.json.abc.tmp").write_text("half")
    (out / ".checkpoint.xyz.tmp").mkdir()
    run_folder.prepare(config_for(init_folder, corpus, out, resume=True), Distributed())
    assert {path.name: path.read_bytes() for path in (out / "final").iterdir()} == final
    assert not list(out.glob(".*"))


def test_resume_checks_the_saved_settings_and_reads_those_of_a_newer_version(tmp_path, init_folder, corpus):
    out = tmp_path / "run"
    train(config_for(init_folder, corpus, out, max_steps=2))
    saved = json.loads((out / "train_config.json").read_text())
    (out / "train_config.json").write_text(json.dumps({**saved, "a_later_setting": 1}))  # unknown: skipped
    config, _ = run_folder.prepare(config_for(init_folder, corpus, out, resume=True), Distributed())
    assert config.seed == 3
    (out / "train_config.json").write_text(json.dumps({**saved, "batch_size": 0}))  # edited by hand
    with pytest.raises(UserError, match="--batch-size must be positive, got 0"):
        run_folder.prepare(config_for(init_folder, corpus, out, resume=True), Distributed())
    for text in ("[]", '{"epochs": 2, "batch_size": 4, "seed": 3, "nonsense": [}'):
        (out / "train_config.json").write_text(text)
        with pytest.raises(UserError, match=r"train_config.json cannot be read \(.*\); the run cannot be resumed"):
            run_folder.prepare(config_for(init_folder, corpus, out, resume=True), Distributed())


def test_a_resume_whose_stories_moved_says_how_to_point_the_run_at_them(tmp_path, init_folder, corpus,
                                                                         monkeypatch):
    import shutil

    from gpt2kids.training import prepare_run

    stories, out = tmp_path / "stories", tmp_path / "run"
    shutil.copytree(corpus, stories)
    train(config_for(init_folder, stories, out, max_steps=2))
    stories.rename(tmp_path / "moved")
    said = (f"the run in {out} read its stories from {stories}, which does not exist now; put them back there, or "
            f'write where they are now (an absolute path) as "data" in {out / "train_config.json"}')
    with pytest.raises(UserError, match=re.escape(said)):
        run_folder.prepare(config_for(init_folder, tmp_path / "moved", out, resume=True), Distributed())
    with pytest.raises(UserError, match=re.escape(said)):  # evaluate --data RUN chooses the held-out ones again
        run_folder.held_out_stories(out)
    saved = json.loads((out / "train_config.json").read_text())
    monkeypatch.setenv("HOME", str(tmp_path))
    (out / "train_config.json").write_text(json.dumps({**saved, "data": "~/moved"}))  # by hand, ~ and all
    assert prepare_run(config_for(init_folder, corpus, out, resume=True)).progress.step == 2
    assert run_folder.held_out_stories(out)
    (out / "train_config.json").write_text(json.dumps({**saved, "data": str(tmp_path / "moved"),
                                                       "eval_data": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match=re.escape(f"read its held-out stories from {tmp_path / 'gone'}, which")):
        run_folder.prepare(config_for(init_folder, corpus, out, resume=True), Distributed())


def test_a_folder_holding_only_checkpoints_is_a_run_a_new_one_does_not_overwrite(tmp_path, init_folder, corpus):
    out = tmp_path / "run"
    (out / "checkpoint-previous").mkdir(parents=True)  # its train_config.json lost
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        run_folder.prepare(config_for(init_folder, corpus, out), Distributed())


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


def test_local_inputs_are_made_absolute_and_hub_ids_are_left_as_they_are(tmp_path, monkeypatch):
    """A resumed run may be started from another folder: its saved local paths must not depend on this one."""
    from gpt2kids.train_config import TrainConfig

    monkeypatch.chdir(tmp_path)
    for name in ("stories", "held-out", "tok", "init"):
        (tmp_path / name).mkdir()
    config = TrainConfig(data="stories", eval_data="held-out", tokenizer="tok", init="init")
    run_folder.make_inputs_absolute(config)
    assert (config.data, config.eval_data, config.tokenizer, config.init) == tuple(
        str(tmp_path / name) for name in ("stories", "held-out", "tok", "init"))
    config = TrainConfig(init="owner/name")  # not a folder here: a hub id
    run_folder.make_inputs_absolute(config)
    assert config.init == "owner/name" and config.data is None


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
    assert run_folder.resume_command(Path("my runs/ü"), 1) == "python train.py --out 'my runs/ü' --resume"


@pytest.mark.parametrize("value", ["8", {}, True])
def test_a_saved_setting_of_the_wrong_type_is_one_line_on_resume(tmp_path, value):
    """A hand-edited train_config.json ("8" for 8) failed later, comparing a str with an int: a traceback."""
    (tmp_path / run_folder.TRAIN_CONFIG).write_text(json.dumps({"batch_size": value}))
    with pytest.raises(UserError, match=r"cannot be read \(batch_size is .*, not int\); the run cannot be resumed"):
        run_folder.read_settings(tmp_path, "the run cannot be resumed")
    (tmp_path / run_folder.TRAIN_CONFIG).write_text(json.dumps({"batch_size": 8, "lr": 1, "dropout": None}))
    config = run_folder.read_settings(tmp_path, "the run cannot be resumed")
    assert (config.batch_size, config.lr, config.dropout) == (8, 1, None)  # an int where a float goes is fine
