"""Atomic file and folder writes: a reader sees the old version or the new one, never half of one.

Each write goes to a temporary name beside the target, is flushed to disk, then renamed over it. The
reading side's two helpers live here too: a folder's visible files (without the temporary names) and a
small JSON file read with a one-line error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from gpt2kids.errors import UserError


def visible_files(folder: Path, skip_folder: Callable[[Path], bool] | None = None) -> list[Path]:
    """The files below `folder`, sorted, without hidden ones or those in hidden folders (.git/, and the
    temporary names atomic writes use), nor those in a folder below it that `skip_folder` says to skip. Links
    to folders are followed (a story folder linked in is read), each real folder once, so a link back up the
    tree ends there."""
    files, walked = [], set()
    for root, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in walked:
            folders.clear()
            continue
        walked.add(real)
        folders[:] = [name for name in folders if not name.startswith(".")
                      and not (skip_folder and skip_folder(Path(root, name)))]
        files += [Path(root, name) for name in names if not name.startswith(".") and Path(root, name).is_file()]
    return sorted(files)


def read_json_object(path: Path, fix: str) -> dict[str, Any] | None:
    """The JSON object in `path`, None when there is no such file; one `UserError` line ending in `fix` when
    the file is not a JSON object."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} cannot be read as JSON ({error}); {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a JSON object; {fix}")
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sync_file(path: Path) -> None:
    """Flush `path` to disk, with the mode of any new file (mkstemp and some writers make 0600)."""
    os.chmod(path, 0o666 & ~_umask())
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _sync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def describe_os_error(error: OSError, path: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}; free some space and retry"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied; choose a writable location"
    return f"cannot write {path}: {error.strerror or error}"


@contextlib.contextmanager
def os_errors_unwrapped() -> Iterator[None]:
    """Inside, a failed write that torch or safetensors reports in an error of its own is raised as the OSError
    it stands for, so that `except OSError` (and `describe_os_error`) handle a full disk wherever it happens:
    torch.save into a Python file raises a RuntimeError over the file's OSError, safetensors' Rust writer a
    SafetensorError naming "(os error N)". Every other error passes through as it is."""
    try:
        yield
    except RuntimeError as error:
        if isinstance(error.__context__, OSError) and not error.__suppress_context__:
            raise error.__context__ from None
        raise
    except SafetensorError as error:
        found = re.search(r"\(os error (\d+)\)", str(error))
        if found is None:
            raise
        number = int(found.group(1))
        raise OSError(number, os.strerror(number)) from None


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    temporary = Path(temporary_name)
    try:
        with os_errors_unwrapped():
            yield temporary
        _sync_file(temporary)
        os.replace(temporary, target)
        _sync_folder(target.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(target: Path, text: str) -> None:
    with atomic_path(target) as temporary:
        temporary.write_bytes(text.encode("utf-8"))


def aside_of(target: Path) -> Path:
    """Where `replace_folder` moves the old `target` while it swaps: a hidden name of its own, so that no
    folder of the user's (a `best.old`, say) is ever taken for it and deleted."""
    return target.with_name(f".{target.name}.replaced")


def replace_folder(target: str | Path, fill: Callable[[Path], None], previous: Path | None = None) -> None:
    """Build a folder with `fill(temporary_folder)`, then swap it in place of `target`.

    The old folder is moved aside (`aside_of`) before the new one is renamed in, so a crash between the
    two renames leaves it aside (`recover_folder` puts it back). With `previous`, the old folder is kept
    there (one generation back) instead of being deleted.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(building, 0o777 & ~_umask())
    aside = previous or aside_of(target)
    try:
        with os_errors_unwrapped():
            fill(building)
        for path in building.rglob("*"):
            if path.is_file():
                _sync_file(path)
        if target.exists():
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(target, aside)
        os.replace(building, target)
        _sync_folder(target.parent)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    if previous is None:
        shutil.rmtree(aside, ignore_errors=True)


def recover_folder(target: Path) -> None:
    """Undo a swap (without `previous`) that was interrupted between its two renames."""
    old = aside_of(target)
    if old.exists() and not target.exists():
        os.replace(old, target)


def check_writable(folder: Path) -> None:
    """Fail early when `folder` could not be created or written; the test file is removed again."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create {folder}: {existing} is a file, not a folder; choose another location")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test."):
            pass
    except OSError as error:
        raise UserError(describe_os_error(error, folder)) from None


def remove_debris(folder: Path) -> None:
    """Delete temporary files and folders that a killed write left behind."""
    for path in folder.glob(".*.tmp"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
