"""`python -m gpt2kids.push`: what it would send to the hub, checked at huggingface_hub's API boundary."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import REPO, config_for
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError

from gpt2kids.errors import UserError
from gpt2kids.push import export_folder, push_export
from gpt2kids.training import train

EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
                "loss.svg")


def fake_export(folder: Path, skip: tuple[str, ...] = ()) -> Path:
    """An export folder's files; push only checks which are there, so their content is a marker."""
    folder.mkdir(parents=True)
    for name in EXPORT_FILES:
        if name not in skip:
            (folder / name).write_text(f"{folder.name}/{name}")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def hub(monkeypatch):
    """Record HfApi.create_repo / create_commit calls, bound to the real signatures so a wrong keyword fails."""
    calls: list[tuple[str, dict]] = []

    def recorder(name: str, result):
        signature = inspect.signature(getattr(HfApi, name))

        def method(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            calls.append((name, {k: v for k, v in bound.arguments.items() if k != "self"}))
            return result
        return method

    # The token check before a run trains: a write token (not recorded: the tests count what is sent).
    monkeypatch.setattr(HfApi, "whoami", lambda self, token=None, *, cache=False: {
        "name": "me", "auth": {"accessToken": {"role": "write"}}})
    monkeypatch.setattr(HfApi, "create_repo", recorder("create_repo", "https://huggingface.co/me/kids"))
    monkeypatch.setattr(HfApi, "create_commit", recorder("create_commit", None))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    return calls


def sent_files(commit: dict) -> dict[str, Path | bytes]:
    """{path in the repo: the local file, or the bytes sent in its place} of a recorded create_commit."""
    return {operation.path_in_repo: Path(operation.path_or_fileobj) if isinstance(operation.path_or_fileobj, str)
            else operation.path_or_fileobj for operation in commit["operations"]}


def test_a_run_folder_pushes_best_privately_and_sends_the_export_files(tmp_path, hub):
    run = tmp_path / "run"
    fake_export(run / "best")
    fake_export(run / "final")
    (run / "best" / ".README.md.x1.tmp").write_text("debris of a killed write")
    before = snapshot(run)

    url = push_export(run, "me/kids", private=True)

    assert url == "https://huggingface.co/me/kids"
    assert [name for name, _ in hub] == ["create_repo", "create_commit"]
    [(_, create), (_, commit)] = hub
    assert create == {"repo_id": "me/kids", "private": True, "exist_ok": True, "repo_type": "model"}
    assert commit["repo_id"] == "me/kids" and commit["repo_type"] == "model"
    sent = sent_files(commit)
    assert set(sent) == set(EXPORT_FILES)  # one commit; the hidden debris left out
    assert all(source == run / "best" / name for name, source in sent.items() if name != "README.md")
    assert sent["README.md"] == b"best/README.md"  # a card without metadata or a Use section goes as it is
    assert snapshot(run) == before


def test_public_by_default_and_final_when_there_is_no_best(tmp_path, hub):
    fake_export(tmp_path / "run" / "final")
    push_export(tmp_path / "run", "me/kids")
    [(_, create), (_, commit)] = hub
    assert create["private"] is False
    assert sent_files(commit)["config.json"] == tmp_path / "run" / "final" / "config.json"


def test_an_export_folder_is_pushed_as_it_is(tmp_path):
    folder = fake_export(tmp_path / "my-export", skip=("tokenizer.json",))
    (folder / "vocab.json").write_text("{}")
    (folder / "merges.txt").write_text("")
    assert export_folder(folder) == folder


def test_an_export_without_its_config_is_named_incomplete_not_taken_for_a_run_folder(tmp_path):
    folder = fake_export(tmp_path / "my-export", skip=("config.json",))
    with pytest.raises(UserError, match=r"my-export is not a complete gpt2kids export: it lacks config.json;"):
        export_folder(folder)


class FailingApi:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.uploads = 0

    def create_repo(self, *args, **kwargs):
        raise self.error

    def create_commit(self, **kwargs):  # pragma: no cover - never reached
        self.uploads += 1


def http_error(status: int, server_message: str | None = None) -> HfHubHTTPError:
    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    message = f"{status} Client Error" + (f"\n\n{server_message}" if server_message else "")
    return HfHubHTTPError(message, response=httpx.Response(status, request=request), server_message=server_message)


@pytest.mark.parametrize(("error", "expected"), [
    (http_error(401), "run `hf auth login` again or set a valid HF_TOKEN"),
    (http_error(403), "may not write to me/kids (403 Forbidden)"),
    (http_error(400, "Invalid metadata in README.md.\n- \"model-index[0]\" is invalid"),
     "the hub refused the upload to me/kids (400: Invalid metadata in README.md. - \"model-index[0]\" is invalid); "
     "fix what it names"),
    (http_error(404), "the hub refused the upload to me/kids (404: 404 Client Error); fix what it names"),
    (http_error(503), "the hub could not take the upload to me/kids (503: 503 Client Error); retry later"),
    (http_error(500), "the hub could not take the upload to me/kids (500: 500 Client Error); retry later"),
    (httpx.ConnectError("[Errno -3] Temporary failure in name resolution"), "check your network and retry"),
], ids=["401", "403", "400 with the hub's reason", "404", "503", "500", "no network"])
def test_hub_errors_become_one_line(tmp_path, hub, error, expected):
    fake_export(tmp_path / "best")
    api = FailingApi(error)
    with pytest.raises(UserError) as raised:
        push_export(tmp_path / "best", "me/kids", api=api)
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    assert api.uploads == 0


class TokenApi:
    """An HfApi whose whoami answers `answer` (a dict) or raises it."""

    def __init__(self, answer) -> None:
        self.answer = answer

    def whoami(self, token=None, **_options):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize(("answer", "expected"), [
    (http_error(401), "the Hugging Face hub refused the token (401 Unauthorized)"),
    ({"name": "me", "auth": {"accessToken": {"role": "read"}}}, "the Hugging Face token can only read"),
    (httpx.ConnectError("[Errno -3] Temporary failure in name resolution"),
     "could not check the Hugging Face token with the hub ([Errno -3] Temporary failure in name resolution); check "
     "your network"),
    (http_error(503), "could not check the Hugging Face token with the hub (503 Client Error)"),
], ids=["refused", "read-only", "no network", "hub down"])
def test_a_token_that_cannot_push_is_one_line(answer, expected):
    from gpt2kids.push import check_token_can_write

    with pytest.raises(UserError) as raised:
        check_token_can_write("hf_test", api=TokenApi(answer))
    assert expected in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("role", ["write", "fineGrained", None])
def test_a_token_that_may_write_passes(role):
    from gpt2kids.push import check_token_can_write

    check_token_can_write("hf_test", api=TokenApi({"name": "me", "auth": {"accessToken": {"role": role}}}))


def test_train_push_to_hub_with_a_token_the_hub_refuses_stops_before_the_run_folder_exists(tmp_path, init_folder,
                                                                                         corpus, hub, monkeypatch):
    monkeypatch.setattr(HfApi, "whoami", lambda self, token=None, **options: (_ for _ in ()).throw(http_error(401)))
    out = tmp_path / "run"
    with pytest.raises(UserError, match="refused the token"):
        train(config_for(init_folder, corpus, out, push_to_hub="me/kids"))
    assert not out.exists()


# --- the command line ---------------------------------------------------------------------------

def without_a_token(home: Path, **env: str) -> dict[str, str]:
    """This environment with no Hugging Face token in it, HF_HOME at `home`, and `env`."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE")}
    return {**environment, "HF_HOME": str(home), **env}


def push_cli(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2kids.push", *args], cwd=REPO,
                          env=without_a_token(home, PYTHONPATH=str(REPO), **env), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(("case", "expected"), [
    ("offline", "the Hugging Face hub is offline here"),
    ("no token", "no Hugging Face token: run `hf auth login` or set HF_TOKEN"),
    ("missing", "is not a folder; pass an export"),
    ("incomplete", "lacks model.safetensors, tokenizer.json (or vocab.json + merges.txt), README.md (the model card)"),
    ("bad repo id", "is not a hub repo id"),
    ("repo id with a newline", "is not a hub repo id"),
    ("repo id without an owner", "'kids' names no owner; use owner/name, e.g. yourname/kids"),
    ("no export", "holds no config.json and no best/ or final/ export"),
])
def test_cli_refuses_in_one_line_with_exit_2_and_changes_nothing(tmp_path, case, expected):
    home = tmp_path / "hf-home"  # empty: no stored token
    home.mkdir()
    run = tmp_path / "run"
    if case == "no export":
        (run / "checkpoint").mkdir(parents=True)  # a run killed before its first export
    else:
        fake_export(run / "best", skip=("model.safetensors", "tokenizer.json", "README.md") if case == "incomplete"
                    else ())
    before = snapshot(tmp_path)
    path = str(tmp_path / "nowhere") if case == "missing" else str(run)
    env = {"HF_HUB_OFFLINE": "1" if case == "offline" else "0"}
    if case == "offline":
        env["HF_TOKEN"] = "hf_test_token_not_real"
    repo_id = {"bad repo id": "me/--bad", "repo id with a newline": "me/kids\nmore",
               "repo id without an owner": "kids"}.get(case, "me/kids")
    result = push_cli(path, repo_id, home=home, **env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert snapshot(tmp_path) == before


def test_train_push_to_hub_without_a_token_stops_before_the_first_step(tmp_path, corpus):
    home = tmp_path / "hf-home"
    home.mkdir()
    out = tmp_path / "run"
    # From scratch, so a check made after the data and model (a BPE trained first) would not be the only line.
    result = subprocess.run([sys.executable, "train.py", "--data", str(corpus), "--init", "scratch", "--model-size",
                             "tiny", "--out", str(out), "--device", "cpu", "--push-to-hub", "me/kids"], cwd=REPO,
                            env=without_a_token(home, HF_HUB_OFFLINE="0"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no Hugging Face token" in lines[0], result.stderr
    assert not out.exists()  # nothing trained, nothing written


def test_a_run_stopped_by_max_steps_says_it_did_not_push(tmp_path, init_folder, corpus, hub, capsys):
    out = tmp_path / "run"
    progress = train(config_for(init_folder, corpus, out, epochs=1, max_steps=2, push_to_hub="me/kids"))
    assert not progress.finished and hub == []
    said = capsys.readouterr().err
    assert "not pushed to me/kids: the run is not finished (step 2 of " in said
    assert f"python -m gpt2kids.push {out} me/kids" in said


def test_a_finished_run_with_push_to_hub_uploads_its_best_export(tmp_path, init_folder, corpus, hub, capsys):
    out = tmp_path / "run"
    progress = train(config_for(init_folder, corpus, out, epochs=1, push_to_hub="me/kids", private=True))
    assert progress.finished
    [(_, create), (_, commit)] = hub
    assert create["repo_id"] == "me/kids" and create["private"] is True
    assert sent_files(commit)["config.json"] == out / "best" / "config.json"  # best/, not final/
    assert f"pushed {out / 'best'} to https://huggingface.co/me/kids" in capsys.readouterr().err

    # Pushed again to another repo: the card sent names that one, the local card stays as it was.
    local_card = (out / "best" / "README.md").read_text()
    push_export(out, "me/other")
    sent_card = sent_files(hub[-1][1])["README.md"].decode()
    assert ModelCard(sent_card).data.model_name == "me/other"
    assert 'pipeline("text-generation", model="me/other", tokenizer="me/other")' in sent_card
    assert "python generate.py --model me/other " in sent_card and "me/kids" not in sent_card
    assert sent_card.replace("me/other", "me/kids") == local_card == (out / "best" / "README.md").read_text()
    # The card is public: local paths appear by their names only.
    assert str(init_folder) not in sent_card and str(corpus) not in sent_card
    assert f"fine-tuned from a local folder, `{init_folder.name}`" in sent_card and corpus.name in sent_card
    assert f"| base model | {init_folder.name} (a local folder) |" in sent_card
