"""Upload an export to the Hugging Face hub: `python -m gpt2kids.push PATH REPO_ID [--private]`.

Nothing local is changed; `export_folder` says which folder is sent and checks it is complete first.
"""

from __future__ import annotations

from gpt2kids.cli import quiet_interrupt_while_starting

if __name__ == "__main__":  # python -m gpt2kids.push
    quiet_interrupt_while_starting()  # before torch's import

import contextlib
from pathlib import Path
from typing import Any

from gpt2kids import model_card
from gpt2kids.atomic_files import visible_files
from gpt2kids.cli import ArgumentParser, run_cli
from gpt2kids.errors import UserError
from gpt2kids.hf import hub_offline, run_export
from gpt2kids.tokenizer import tokenizer_files_in


def export_folder(path: str | Path) -> Path:
    """The export to upload: `path` itself, or a run folder's `best/`, else its `final/`; checked complete."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; pass an export (runs/NAME/best) or a run folder (runs/NAME)")
    if (path / "config.json").is_file() or (path / "model.safetensors").is_file():
        folder = path  # an export, complete or not
    else:
        folder = run_export(path)
        if folder is None:
            raise UserError(f"{path} holds no config.json and no best/ or final/ export; pass a gpt2kids run "
                            "folder or an export folder")
    missing = [name for name in ("config.json", "model.safetensors") if not (folder / name).is_file()]
    if not tokenizer_files_in(folder):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if not (folder / "README.md").is_file():
        missing.append("README.md (the model card)")
    if missing:
        raise UserError(f"{folder} is not a complete gpt2kids export: it lacks {', '.join(missing)}; pass a run "
                        "folder or its best/ or final/ export")
    return folder


REFUSED_TOKEN = ("the Hugging Face hub refused the token (401 Unauthorized): run `hf auth login` again or set a "
                 "valid HF_TOKEN")


def _hub_error(error: Exception, repo_id: str) -> UserError:
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(error.response, "status_code", None) if isinstance(error, HfHubHTTPError) else None
    if status == 401:
        return UserError(REFUSED_TOKEN)
    if status == 403:
        return UserError(f"the token may not write to {repo_id} (403 Forbidden): use a token with write access, "
                         "and a repo under your own name or an organisation you belong to")
    if status is not None:  # the hub answered: its own reason says what to fix, not the network
        said = " ".join((error.server_message or str(error)).split())[:300]
        if status >= 500:
            return UserError(f"the hub could not take the upload to {repo_id} ({status}: {said}); retry later")
        return UserError(f"the hub refused the upload to {repo_id} ({status}: {said}); fix what it names and retry")
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return UserError(f"the upload to {repo_id} failed ({reason}); check your network and retry")


def check_can_push(repo_id: str) -> str:
    """Everything that can fail before a byte is sent (the repo id, offline mode, the token); returns the token.

    The trainer calls it before training when --push-to-hub is given, so a run does not end in a refusal.
    """
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        reason = " ".join(str(error).split())  # one line, whatever the id holds
        raise UserError(f"{repo_id!r} is not a hub repo id ({reason}); use owner/name, e.g. "
                        "yourname/gpt2-indo-kids-stories") from None
    if "/" not in repo_id:  # the hub would put it under the token's user, and the card would name it wrongly
        raise UserError(f"{repo_id!r} names no owner; use owner/name, e.g. yourname/{repo_id}")
    offline_switch = hub_offline()
    if offline_switch is not None:
        raise UserError(f"the Hugging Face hub is offline here ({offline_switch} is set); unset it and retry")
    try:
        token = get_token()
    except Exception as error:  # e.g. an OIDC exchange that failed
        raise UserError(f"could not get a Hugging Face token ({error}); run `hf auth login` or set HF_TOKEN") from None
    if not token:
        raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access)")
    return token


def commit_files(folder: Path, repo_id: str) -> list[Any]:
    """The export's files as one commit's operations, its card naming `repo_id`. Hidden files are left out:
    debris of an interrupted write, editor files."""
    from huggingface_hub import CommitOperationAdd

    operations = []
    for path in visible_files(folder):
        content: Path | bytes = path
        if path == folder / "README.md":
            with contextlib.suppress(UnicodeDecodeError):  # a card that is not UTF-8 text goes as it is
                content = model_card.for_repo(path.read_text(encoding="utf-8"), repo_id).encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=content))
    return operations


def check_token_can_write(token: str, api: Any = None) -> None:
    """Ask the hub about `token` (one request), so that a token it refuses, a read-only token or no network is said
    before a run trains rather than after its last epoch. `api` (an `HfApi`) is for tests."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = api if api is not None else HfApi(token=token)
    try:
        info = api.whoami(token=token)
    except Exception as error:  # huggingface_hub and its HTTP client raise many classes
        if isinstance(error, HfHubHTTPError) and getattr(error.response, "status_code", None) == 401:
            raise UserError(REFUSED_TOKEN) from None
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise UserError(f"could not check the Hugging Face token with the hub ({reason}); check your network and "
                        "retry, or train without --push-to-hub and push afterwards with python -m gpt2kids.push") \
            from None
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role") if isinstance(info, dict) else None
    if role == "read":
        raise UserError("the Hugging Face token can only read: set HF_TOKEN to a token with write access, or run "
                        "`hf auth login --force` with one")


def push_export(folder: Path, repo_id: str, private: bool = False, api: Any = None) -> str:
    """Upload `folder` (an export, or a run folder) to the hub model repo `repo_id`; returns the repo URL.

    The repo is created if needed (`private` applies only then). `api` (an `HfApi`) is for tests.
    """
    from huggingface_hub import HfApi

    folder = export_folder(folder)
    token = check_can_push(repo_id)
    api = api if api is not None else HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(repo_id=repo_id, operations=commit_files(folder, repo_id), repo_type="model",
                          commit_message=f"Upload {folder.name}/ from gpt2kids")
    except Exception as error:  # huggingface_hub and its HTTP client raise many classes; all mean "not sent"
        raise _hub_error(error, repo_id) from None
    return str(url)


def main() -> None:
    parser = ArgumentParser(prog="python -m gpt2kids.push",
                            description="Upload a gpt2kids export (with its model card) to the Hugging Face hub.")
    parser.add_argument("path", metavar="PATH", help="an export folder, or a run folder (its best/, else final/)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the hub model repo, owner/name")
    parser.add_argument("--private", action="store_true", help="make the repo private if it is created here")
    args = parser.parse_args()
    print(push_export(Path(args.path), args.repo_id, private=args.private))


if __name__ == "__main__":
    run_cli(main)
