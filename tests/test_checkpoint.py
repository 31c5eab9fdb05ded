"""A killed or interrupted run loses nothing; damaged checkpoints are caught; a full disk loses nothing.

Faults are injected by tests/faults.py, which runs train.py and kills it (SIGKILL) or signals it at
a named point. After each fault, `--resume` must end with exactly the weights of an unbroken run.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, config_for, final_weights, run_train
from safetensors import SafetensorError
from safetensors.torch import load_file

from gpt2kids import checkpoint
from gpt2kids.atomic_files import aside_of
from gpt2kids.errors import UserError
from gpt2kids.training import train

# Dropout on, so the RNG state must be restored too; checkpoints every 10 steps and each epoch (47 steps).
SETTINGS = dict(epochs=2, eval_every=10, save_every=10, dropout=0.1)


def flags(init_folder, corpus, out, *extra: str) -> list[str]:
    return ["--data", str(corpus), "--init", str(init_folder), "--out", str(out), "--epochs", "2",
            "--batch-size", "4", "--block-size", "64", "--lr", "1e-3", "--precision", "fp32", "--device", "cpu",
            "--seed", "3", "--eval-every", "10", "--save-every", "10", "--dropout", "0.1", *extra]


def run_with_fault(fault: str, arguments: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tests/faults.py", fault, "--", *arguments], cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, init_folder, corpus):
    """The reference: the same run, never stopped (its checkpoint's weights, and best/ and final/)."""
    out = tmp_path_factory.mktemp("unbroken") / "run"
    result = run_train(*flags(init_folder, corpus, out))
    assert result.returncode == 0, result.stderr
    return final_weights(out), {which: load_file(out / which / "model.safetensors") for which in ("best", "final")}


def assert_same_as_unbroken(out, unbroken, exports=("final",)) -> None:
    reference_checkpoint, reference_exports = unbroken
    for key, value in final_weights(out).items():
        assert torch.equal(value, reference_checkpoint[key]), key
    for which in exports:
        for key, value in load_file(out / which / "model.safetensors").items():
            assert torch.equal(value, reference_exports[which][key]), (which, key)


@pytest.mark.parametrize("fault, resumes_from", [
    ("step:15", 10),  # SIGKILL in the middle of an optimizer step
    ("eval:2", 10),  # during the evaluation at step 20, before that step's checkpoint
    ("checkpoint:2", 10),  # while the step-20 checkpoint is being written
    ("swap:1", 10),  # between the two renames of the step-20 checkpoint: checkpoint/ is gone
])
def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path, init_folder, corpus, unbroken, fault,
                                                        resumes_from):
    out = tmp_path / "run"
    killed = run_with_fault(fault, flags(init_folder, corpus, out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Whatever the kill interrupted, one complete checkpoint is there, the one before the kill.
    good = [folder for folder in (out / checkpoint.CHECKPOINT, out / checkpoint.PREVIOUS)
            if folder.is_dir() and checkpoint.damage_in(folder) is None]
    assert good and checkpoint.load_latest_good(out).progress["step"] == resumes_from
    resumed = run_train("--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at step {resumes_from}" in resumed.stderr
    assert_same_as_unbroken(out, unbroken)
    assert not list(out.glob(".*.tmp")), "debris of the killed write was not cleaned up"


@pytest.mark.parametrize("signal_name, exit_status", [("sigint", 130), ("sigterm", 143)])
def test_ctrl_c_and_sigterm_save_a_checkpoint_and_say_how_to_resume(tmp_path, init_folder, corpus, unbroken,
                                                                    signal_name, exit_status):
    out = tmp_path / "run"
    stopped = run_with_fault(f"{signal_name}:15", flags(init_folder, corpus, out))
    assert stopped.returncode == exit_status, stopped.stderr
    assert f"continue with: python train.py --out {out} --resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert checkpoint.load_latest_good(out).progress["step"] == 15
    resumed = run_train("--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as_unbroken(out, unbroken)


def damage(path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name, how", [("model.safetensors", "truncate"), ("state.pt", "alter")])
def test_damaged_checkpoint_is_detected_and_the_previous_one_used(tmp_path, init_folder, corpus, unbroken, name,
                                                                  how):
    out = tmp_path / "run"
    first = run_train(*flags(init_folder, corpus, out, "--max-steps", "20"))
    assert first.returncode == 0, first.stderr
    damage(out / "checkpoint" / name, how)
    resumed = run_train("--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{out / 'checkpoint' / name} is damaged" in resumed.stderr
    assert f"resuming {out} at step 10" in resumed.stderr
    assert_same_as_unbroken(out, unbroken)


def test_after_falling_back_the_next_checkpoint_keeps_the_good_one_as_previous(tmp_path, init_folder, corpus):
    out = tmp_path / "run"
    assert run_train(*flags(init_folder, corpus, out, "--max-steps", "20")).returncode == 0
    damage(out / "checkpoint" / "state.pt", "alter")
    # Resumed at step 10 and stopped at 11: one checkpoint is written after the fallback.
    resumed = run_train("--out", str(out), "--resume", "--max-steps", "11")
    assert resumed.returncode == 0, resumed.stderr
    assert f"moved the damaged {out / 'checkpoint'} to {out / checkpoint.DAMAGED}" in resumed.stderr
    assert checkpoint.damage_in(out / "checkpoint") is None
    assert checkpoint.damage_in(out / checkpoint.PREVIOUS) is None  # step 10's, not the damaged step 20
    assert json.loads((out / checkpoint.PREVIOUS / "progress.json").read_text())["step"] == 10
    assert checkpoint.damage_in(out / checkpoint.DAMAGED) is not None  # kept for a look, out of the rotation


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path, init_folder, corpus, unbroken):
    out = tmp_path / "run"
    killed = run_with_fault("step:5", flags(init_folder, corpus, out))  # checkpoints come every 10 steps
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not checkpoint.exists(out) and (out / "train_config.json").is_file()
    resumed = run_train("--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "holds no checkpoint yet" in resumed.stderr and "starting it again from step 0" in resumed.stderr
    assert_same_as_unbroken(out, unbroken)


def test_a_state_file_that_asks_to_run_code_is_one_line(tmp_path, init_folder, corpus):
    out = tmp_path / "run"
    assert run_train(*flags(init_folder, corpus, out, "--max-steps", "10")).returncode == 0
    # A pickle naming a function: weights_only refuses it before anything runs. The manifest is made to
    # match, as a checkpoint from someone else would.
    torch.save({"optimizer": print}, out / "checkpoint" / "state.pt")
    manifest = json.loads((out / "checkpoint" / checkpoint.MANIFEST).read_text())
    manifest["state.pt"] = checkpoint.sha256_of(out / "checkpoint" / "state.pt")
    (out / "checkpoint" / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    resumed = run_train("--out", str(out), "--resume")
    assert resumed.returncode == 2, resumed.stderr
    lines = resumed.stderr.splitlines()  # one line, and not torch's advice on loading it with weights_only=False
    assert lines == [f"error: {out / 'checkpoint' / 'state.pt'} asks to run code when unpickled (print), so it was "
                     "not loaded; resume only checkpoints gpt2kids wrote"]


@pytest.mark.parametrize("content", ["random bytes", "a protocol 4 pickle"])
def test_a_state_file_torch_cannot_read_safely_is_one_line_and_no_warning(tmp_path, recwarn, content):
    """torch refuses both with the same "Unsupported operand" (its safe unpickler reads protocol 2): the message
    does not guess which, and torch's warning about the protocol is not shown."""
    checkpoint.save(tmp_path, tiny_model(1), {"progress": {"step": 10}})
    state = tmp_path / "checkpoint" / "state.pt"  # the manifest is not consulted by _read
    if content == "random bytes":
        state.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                          .numpy().tobytes())
    else:
        torch.save({"optimizer": print}, state, pickle_protocol=4)
    with pytest.raises(UserError) as error:
        checkpoint._read(tmp_path / "checkpoint")
    assert str(error.value) == (f"cannot read the checkpoint in {tmp_path / 'checkpoint'} (its state.pt is not a "
                                "state file gpt2kids wrote)")
    assert not recwarn.list


def test_both_checkpoints_damaged_stops_with_a_clear_message(tmp_path, init_folder, corpus):
    out = tmp_path / "run"
    assert run_train(*flags(init_folder, corpus, out, "--max-steps", "20")).returncode == 0
    damage(out / "checkpoint" / "model.safetensors", "alter")
    damage(out / "checkpoint-previous" / "state.pt", "truncate")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    resumed = run_train("--out", str(out), "--resume")
    assert resumed.returncode == 2
    assert resumed.stderr.startswith("error: no usable checkpoint") and resumed.stderr.count("\n") == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("text", ["{not json", "[]", "null"])
def test_a_damaged_manifest_is_reported_not_raised(tmp_path, text):
    (tmp_path / checkpoint.MANIFEST).write_text(text)
    assert checkpoint.damage_in(tmp_path) == f"{tmp_path / checkpoint.MANIFEST} is damaged"


def test_the_manifest_names_a_missing_or_altered_file_and_passes_a_whole_one(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "progress.json").write_text("{}")
    manifest = {name: checkpoint.sha256_of(tmp_path / name) for name in ("model.safetensors", "progress.json")}
    manifest["state.pt"] = "0" * 64
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.damage_in(tmp_path) == f"{tmp_path / 'state.pt'} is missing"
    (tmp_path / "state.pt").write_bytes(b"state")
    assert checkpoint.damage_in(tmp_path).startswith(f"{tmp_path / 'state.pt'} is damaged (its checksum")
    manifest["state.pt"] = checkpoint.sha256_of(tmp_path / "state.pt")
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.damage_in(tmp_path) is None
    del manifest["progress.json"]  # parses, but vouches for less than a checkpoint holds
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.damage_in(tmp_path) == f"{tmp_path / checkpoint.MANIFEST} does not list progress.json"
    (tmp_path / checkpoint.MANIFEST).write_text("{}")
    assert checkpoint.damage_in(tmp_path) == f"{tmp_path / checkpoint.MANIFEST} does not list model.safetensors"


def tiny_model(seed: int):
    from gpt2kids.config import GPT2Config
    from gpt2kids.model import GPT2

    torch.manual_seed(seed)
    return GPT2(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2))


def test_save_vouches_for_every_file_and_keeps_the_one_it_replaces_as_previous(tmp_path):
    for step in (10, 20):
        checkpoint.save(tmp_path, tiny_model(step), {"progress": {"step": step}, "rng": checkpoint.rng_states()})
    manifest = json.loads((tmp_path / "checkpoint" / checkpoint.MANIFEST).read_text())
    assert sorted(manifest) == sorted(checkpoint.FILES)
    for folder, step in (("checkpoint", 20), (checkpoint.PREVIOUS, 10)):
        assert checkpoint.damage_in(tmp_path / folder) is None
        assert json.loads((tmp_path / folder / "progress.json").read_text()) == {"step": step}
    latest = checkpoint.load_latest_good(tmp_path)
    assert latest.folder == tmp_path / "checkpoint" and latest.progress == {"step": 20}
    for key, value in tiny_model(20).untied_state_dict().items():
        assert torch.equal(latest.model[key], value), key


def test_the_rng_states_saved_give_the_same_draws_again(tmp_path):
    """torch's (dropout, initialisation) and Python's (the block order's shuffles)."""
    import random

    torch.manual_seed(7)
    random.seed(7)
    checkpoint.save(tmp_path, tiny_model(0), {"progress": {"step": 1}, "rng": checkpoint.rng_states()})
    expected = (torch.rand(4), random.random())
    torch.manual_seed(8)
    random.seed(8)
    checkpoint.restore_rng_states(checkpoint.load_latest_good(tmp_path).state["rng"])
    again = (torch.rand(4), random.random())
    assert torch.equal(again[0], expected[0]) and again[1] == expected[1]


def test_a_damaged_checkpoint_set_aside_replaces_an_older_one_set_aside(tmp_path):
    for step in (10, 20):
        (tmp_path / "checkpoint").mkdir()
        (tmp_path / "checkpoint" / "progress.json").write_text(json.dumps({"step": step}))
        checkpoint.set_aside_damaged(tmp_path)
    assert not (tmp_path / "checkpoint").exists()
    assert json.loads((tmp_path / checkpoint.DAMAGED / "progress.json").read_text()) == {"step": 20}


def test_the_fallback_is_said_once_and_nothing_to_resume_is_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="nothing to resume in .*: it holds no checkpoint; drop --resume"):
        checkpoint.load_latest_good(tmp_path)
    for step in (10, 20):
        checkpoint.save(tmp_path, tiny_model(step), {"progress": {"step": step}})
    capsys.readouterr()
    checkpoint.load_latest_good(tmp_path)
    assert capsys.readouterr().err == ""
    (tmp_path / "checkpoint" / "progress.json").write_text('{"step": 21}')
    assert checkpoint.load_latest_good(tmp_path).progress == {"step": 10}
    err = capsys.readouterr().err
    assert err == (f"warning: {tmp_path / 'checkpoint' / 'progress.json'} is damaged (its checksum does not match the "
                   f"manifest); resuming from the previous checkpoint {tmp_path / checkpoint.PREVIOUS}\n"), err


def test_a_run_killed_between_the_renames_of_a_save_still_has_a_checkpoint(tmp_path):
    """The old checkpoint/ is already checkpoint-previous/ and the new one not yet renamed in."""
    for step in (10, 20):
        checkpoint.save(tmp_path, tiny_model(step), {"progress": {"step": step}})
    shutil.rmtree(tmp_path / "checkpoint")
    assert checkpoint.exists(tmp_path)
    assert checkpoint.load_latest_good(tmp_path).progress == {"step": 10}


def test_a_full_disk_while_torch_writes_the_state_is_one_line_and_keeps_the_previous_checkpoint(tmp_path,
                                                                                                 monkeypatch):
    import io

    checkpoint.save(tmp_path, tiny_model(1), {"progress": {"step": 10}})
    real_save = torch.save

    class FullDisk(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    # torch.save as it goes on a full disk: through the file's buffer, its own RuntimeError over the OSError.
    monkeypatch.setattr(torch, "save", lambda state, _handle: real_save(state, io.BufferedWriter(FullDisk())))
    with pytest.raises(UserError, match=r"^no space left on the device while writing .*; the last checkpoint \(.*/"
                                        r"checkpoint/\) is untouched$"):
        checkpoint.save(tmp_path, tiny_model(2), {"progress": {"step": 20}, "optimizer": torch.zeros(4096)})
    with pytest.raises(UserError, match="no checkpoint was written$"):  # the run's first
        checkpoint.save(tmp_path / "new", tiny_model(2), {"progress": {"step": 10}, "optimizer": torch.zeros(4096)})
    fell_back = tmp_path / "fell-back"  # a resume fell back to checkpoint-previous/ and set checkpoint/ aside
    (fell_back / "checkpoint-previous").mkdir(parents=True)
    with pytest.raises(UserError, match=re.escape(f"the last checkpoint ({fell_back / 'checkpoint-previous'}/) is "
                                                  "untouched")):
        checkpoint.save(fell_back, tiny_model(2), {"progress": {"step": 10}, "optimizer": torch.zeros(4096)})
    monkeypatch.undo()
    assert checkpoint.load_latest_good(tmp_path).progress == {"step": 10}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint", "fell-back", "new"]
    assert not list((tmp_path / "new").iterdir())


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, init_folder, corpus, monkeypatch):
    out = tmp_path / "run"
    real_save_file = checkpoint.save_file
    saves = {"n": 0}

    def save_file_on_a_full_disk(*args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # what safetensors raised on a full tmpfs (0.8), not an OSError
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file_on_a_full_disk)
    with pytest.raises(UserError, match="no space left on the device") as error:
        train(config_for(init_folder, corpus, out, **SETTINGS))
    assert f"the last checkpoint ({out / 'checkpoint'}/) is untouched" in str(error.value)
    assert checkpoint.damage_in(out / "checkpoint") is None
    assert json.loads((out / "checkpoint" / "progress.json").read_text())["step"] == 10
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("which", ["best", "final"])
def test_sigkill_between_the_renames_of_an_export_swap(tmp_path, init_folder, corpus, unbroken, which):
    out = tmp_path / "run"
    if which == "best":
        # The first time best/ is replaced: the evaluation at step 20 improved on step 10's.
        killed = run_with_fault("best-swap:1", flags(init_folder, corpus, out))
    else:
        # final/ is only replaced when a run that stopped at --max-steps is resumed: at its very end.
        assert run_train(*flags(init_folder, corpus, out, "--max-steps", "20")).returncode == 0
        killed = run_with_fault("final-swap:1", ["--out", str(out), "--resume"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # The kill fell between the two renames: the old export is aside, none is in place.
    assert aside_of(out / which).is_dir() and not (out / which).exists()
    if which == "best":
        # A resume that stops before the next evaluation shows the recovery alone: the export moved
        # aside is back in place, whole.
        aside = {p.name: p.read_bytes() for p in aside_of(out / "best").iterdir()}
        assert run_train("--out", str(out), "--resume", "--max-steps", "11").returncode == 0
        assert {p.name: p.read_bytes() for p in (out / "best").iterdir()} == aside
        assert not aside_of(out / "best").exists()

    resumed = run_train("--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as_unbroken(out, unbroken, exports=("best", "final"))
    assert not list(out.glob(".*.replaced")) and not list(out.glob(".*.tmp")), sorted(p.name for p in out.iterdir())
