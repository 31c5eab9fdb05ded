"""Atomic writes: the target is the old version or the new one, never half of one, and nothing is left behind."""

from __future__ import annotations

import errno
import io
import os
import stat

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from gpt2kids import atomic_files
from gpt2kids.atomic_files import (
    aside_of,
    atomic_write_text,
    check_writable,
    describe_os_error,
    read_json_object,
    recover_folder,
    remove_debris,
    replace_folder,
    visible_files,
)
from gpt2kids.errors import UserError


def names(folder) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))


def test_visible_files_leave_out_hidden_names_and_follow_a_linked_folder_once(tmp_path):
    root = tmp_path / "stories"
    (root / "a").mkdir(parents=True)
    (root / "a" / "one.txt").write_text("satu")
    (root / ".hidden.txt").write_text("editor file")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("not a story")
    (root / ".final.tmp").mkdir()  # a half-written export
    (root / ".final.tmp" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "two.txt").write_text("dua")
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    (root / "a" / "up").symlink_to(root)  # a link back up the tree: read once, not forever
    assert [path.relative_to(root).as_posix() for path in visible_files(root)] == ["a/one.txt", "linked/two.txt"]


def test_read_json_object_is_none_for_no_file_and_one_line_for_a_bad_one(tmp_path):
    assert read_json_object(tmp_path / "missing.json", "fix it") is None
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"list.json does not hold a JSON object; fix it$"):
        read_json_object(tmp_path / "list.json", "fix it")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match=r"broken.json cannot be read as JSON \(.*\); fix it$"):
        read_json_object(tmp_path / "broken.json", "fix it")
    (tmp_path / "good.json").write_text('{"a": 1}')
    assert read_json_object(tmp_path / "good.json", "fix it") == {"a": 1}


@pytest.fixture
def disk_events(monkeypatch) -> list[tuple[str, str]]:
    """Each fsync (of the path behind the descriptor) and each rename, in order."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the file behind a descriptor")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", str(source)))
        real_replace(source, target)

    monkeypatch.setattr(atomic_files.os, "fsync", fsync)
    monkeypatch.setattr(atomic_files.os, "replace", replace)
    return events


def test_an_atomic_write_is_flushed_to_disk_before_it_is_renamed_in(tmp_path, disk_events):
    """A rename that reaches the disk before the data would leave an empty file after a power cut."""
    atomic_write_text(tmp_path / "settings.json", "{}\n")
    assert (tmp_path / "settings.json").read_text() == "{}\n"
    renames = [event for event in disk_events if event[0] == "replace"]
    assert len(renames) == 1
    assert disk_events.index(("fsync", renames[0][1])) < disk_events.index(renames[0])
    assert disk_events[-1] == ("fsync", str(tmp_path))  # the rename itself, made durable


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "settings.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_files.atomic_path(target) as temporary:
        temporary.write_text("half of the new")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "old" and names(tmp_path) == ["settings.json"]


def fill_with(text: str):
    def fill(folder):
        (folder / "model.safetensors").write_text(text)
        (folder / "sub").mkdir()
        (folder / "sub" / "file").write_text(text)
    return fill


def test_replace_folder_swaps_in_the_new_folder_and_removes_the_old_one(tmp_path):
    target = tmp_path / "best"
    replace_folder(target, fill_with("1"))
    previous = os.umask(0o022)
    try:
        replace_folder(target, fill_with("2"))
    finally:
        os.umask(previous)
    # Readable like any folder the user makes (mkdtemp makes 0700), its files too (see _sync_file).
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o644
    assert (target / "model.safetensors").read_text() == "2" and (target / "sub" / "file").read_text() == "2"
    assert names(tmp_path) == ["best", "best/model.safetensors", "best/sub", "best/sub/file"]


def test_replace_folder_flushes_every_file_before_the_folder_is_renamed_in(tmp_path, disk_events):
    replace_folder(tmp_path / "best", fill_with("1"))
    building = [source for kind, source in disk_events if kind == "replace"]
    assert len(building) == 1 and building[0].startswith(str(tmp_path / ".best."))
    renamed = disk_events.index(("replace", building[0]))
    for name in ("model.safetensors", "sub/file"):
        assert disk_events.index(("fsync", f"{building[0]}/{name}")) < renamed, name
    assert disk_events[-1] == ("fsync", str(tmp_path))


def test_replace_folder_keeps_one_generation_back_in_previous(tmp_path):
    target, previous = tmp_path / "checkpoint", tmp_path / "checkpoint-previous"
    for generation in "123":
        replace_folder(target, fill_with(generation), previous=previous)
    assert (target / "model.safetensors").read_text() == "3"
    assert (previous / "model.safetensors").read_text() == "2"  # the older "1" is gone, not merged in
    assert names(previous) == ["model.safetensors", "sub", "sub/file"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint", "checkpoint-previous"]


def test_a_fill_that_fails_leaves_the_target_as_it_was_and_no_debris(tmp_path):
    target = tmp_path / "final"
    replace_folder(target, fill_with("old"))

    def fill(folder):
        fill_with("new")(folder)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        replace_folder(target, fill)
    assert (target / "model.safetensors").read_text() == "old"
    assert names(tmp_path) == ["final", "final/model.safetensors", "final/sub", "final/sub/file"]


class FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails as the kernel fails it."""

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def torch_save_on_a_full_disk(folder):
    # Through a buffer, as into a file opened "wb": torch raises a RuntimeError of its own, the OSError its context.
    torch.save({"weights": torch.zeros(4096)}, io.BufferedWriter(FullDisk()))


def safetensors_in_a_missing_folder(folder):
    save_file({"weights": torch.zeros(4)}, folder / "missing" / "model.safetensors")  # its own SafetensorError


def safetensors_on_a_full_disk(folder):
    # What save_file raised on a full tmpfs (safetensors 0.8); a real one needs a filesystem to fill.
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("fill, number", [
    (torch_save_on_a_full_disk, errno.ENOSPC),
    (safetensors_on_a_full_disk, errno.ENOSPC),
    (safetensors_in_a_missing_folder, errno.ENOENT),
])
def test_a_write_a_library_reports_in_its_own_words_fails_as_its_os_error(tmp_path, fill, number):
    """So that the callers' `except OSError` turns a full disk into one line (describe_os_error)."""
    with pytest.raises(OSError) as error:
        replace_folder(tmp_path / "final", fill)
    assert error.value.errno == number
    assert names(tmp_path) == []
    with pytest.raises(OSError) as error, atomic_files.atomic_path(tmp_path / "cache.safetensors") as temporary:
        fill(temporary.parent)
    assert error.value.errno == number
    assert names(tmp_path) == []


def test_other_errors_of_a_fill_stay_as_they_are(tmp_path):
    def bug(folder):
        raise ValueError("a bug in the fill (os error 28)")

    def check(folder):  # one of our own errors, raised while handling an OSError
        try:
            (folder / "missing" / "tokenizer.json").read_text()
        except OSError:
            raise UserError("the tokenizer is not there") from None

    with pytest.raises(ValueError, match="a bug in the fill"):
        replace_folder(tmp_path / "final", bug)
    with pytest.raises(UserError, match="the tokenizer is not there"):
        replace_folder(tmp_path / "final", check)


def test_recover_folder_puts_back_an_export_left_aside_and_only_then(tmp_path):
    target = tmp_path / "best"
    aside_of(target).mkdir()
    (aside_of(target) / "model.safetensors").write_text("old")
    recover_folder(target)
    assert (target / "model.safetensors").read_text() == "old" and not aside_of(target).exists()
    # With the new export in place, the swap had finished: the one aside is not put over it.
    aside_of(target).mkdir()
    recover_folder(target)
    assert (target / "model.safetensors").read_text() == "old" and aside_of(target).is_dir()


def test_remove_debris_deletes_temporary_files_and_folders_only(tmp_path):
    (tmp_path / ".train_config.json.abc.tmp").write_text("half")
    (tmp_path / ".checkpoint.xyz.tmp").mkdir()
    (tmp_path / ".checkpoint.xyz.tmp" / "state.pt").write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("the user's")
    (tmp_path / ".best.replaced").mkdir()  # recover_folder's, not debris
    remove_debris(tmp_path)
    assert names(tmp_path) == [".best.replaced", "notes.tmp"]


def test_check_writable_refuses_a_path_through_a_file_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="a-file is a file, not a folder"):
        check_writable(tmp_path / "a-file" / "run")
    check_writable(tmp_path / "new" / "run")  # created later, by the run: its nearest existing parent is written
    assert names(tmp_path) == ["a-file"]

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic_files.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(UserError, match=r"cannot write .*run: permission denied; choose a writable location"):
        check_writable(tmp_path / "run")


@pytest.mark.parametrize("code, message", [
    (errno.ENOSPC, "no space left on the device while writing /x; free some space and retry"),
    (errno.EACCES, "cannot write /x: permission denied; choose a writable location"),
    (errno.EPERM, "cannot write /x: permission denied; choose a writable location"),
    (errno.EROFS, "cannot write /x: permission denied; choose a writable location"),
    (errno.EIO, "cannot write /x: Input/output error"),
])
def test_describe_os_error(code, message):
    from pathlib import Path

    assert describe_os_error(OSError(code, os.strerror(code)), Path("/x")) == message
