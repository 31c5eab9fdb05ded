"""`python generate.py --serve`: the page in a real browser, its API through gradio_client, the stream in-process.

The server runs as a real subprocess on a small exported model; the browser is Debian's chromium
driven by playwright. Outside CI, tests that need gradio, playwright or chromium are skipped when
one is missing; in CI (CI set) they fail instead, since .ci/run installs them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import REPO, SAMPLE_TEXTS

from gpt2kids.cli import run_cli
from gpt2kids.config import GPT2Config
from gpt2kids.errors import UserError
from gpt2kids.hf import export, load_model
from gpt2kids.logits_processors import SamplingSettings
from gpt2kids.model import GPT2
from gpt2kids.serve import MISSING_GRADIO, WIDGET_PROMPT, build_app, serve, stream_story
from gpt2kids.text_generation import StoryGenerator

sys.path.insert(0, str(REPO))
import generate as generate_cli
from gpt2kids.tokenizer import Tokenizer

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
PROMPT = "Pada suatu hari, Sari pergi ke pasar"
OTHER_PROMPT = "Kancil melompat"
MAX_NEW = 200  # with the model below, long enough to watch the page grow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "GRADIO_ANALYTICS_ENABLED": "False"}


def missing(message: str) -> None:
    """Skip the test, or fail it in CI (which installs everything)."""
    pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)


def need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        missing(f'{module} is not installed: pip install -e ".[demo,dev]"')


def need_chromium() -> None:
    need("playwright")
    if not Path(CHROMIUM).exists():
        missing(f"{CHROMIUM} is missing: apt-get install -y chromium")


def run_generate(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "generate.py", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def story_model(tokenizer, tmp_path_factory) -> Path:
    """A random GPT-2 (context 256) whose greedy stories are printable text running the full length.

    End-of-text and the tokens that decode to nothing printable alone (a lone byte of a multi-byte
    character, a control byte) get a zero embedding: tied to the LM head, their logit is exactly 0,
    below the best of the other tokens' random logits, so greedy decoding never picks them.
    384 wide and 6 layers make 200 tokens take long enough (most of a second on an idle 2-core machine)
    to watch the page grow.
    """
    torch.manual_seed(5)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=256, n_embd=384, n_layer=6, n_head=6,
                        bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    model = GPT2(config)
    unprintable = [token for token in range(tokenizer.vocab_size)
                   if token == tokenizer.eos_id or not tokenizer.decode([token]).isprintable()
                   or "\ufffd" in tokenizer.decode([token])]
    with torch.no_grad():
        model.transformer.wte.weight[unprintable] = 0
    folder = tmp_path_factory.mktemp("serve") / "final"
    export(model, tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def cli_greedy(story_model) -> str:
    """`generate.py --greedy`'s text for PROMPT (tests ask for it before `server`: the two never share the cores)."""
    result = run_generate("--greedy", "--format", "jsonl", "--max-new-tokens", str(MAX_NEW), "--precision", "fp32",
                          "--model", str(story_model), PROMPT)
    assert result.returncode == 0, result.stderr
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["new_tokens"] == MAX_NEW  # the model above never ends a story early
    return record["text"]


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    """Where the server's stderr goes."""
    return tmp_path_factory.mktemp("server") / "stderr.txt"


@pytest.fixture(scope="module")
def server(story_model, server_log) -> Iterator[str]:
    """`generate.py --serve` in a subprocess; its URL once it answers. Always stopped afterwards."""
    need("gradio")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = server_log
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "generate.py", "--serve", "--model", str(story_model), "--port", str(port),
             "--host", "127.0.0.1", "--precision", "fp32"],
            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost, never a proxy
        deadline = time.monotonic() + 120  # loading torch, the model and gradio on a busy 2-core machine
        while True:
            assert process.poll() is None, f"the server exited with {process.returncode}: {log.read_text()}"
            try:
                with opener.open(url, timeout=5) as response:
                    # The page may answer a moment before the server says where it is.
                    if response.status == 200 and f"serving {url}" in log.read_text():
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the server did not answer on {url}: {log.read_text()}"
            time.sleep(0.25)
        yield url
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # Only generated text may go to stdout; the server generates none there.
        assert process.stdout.read() == ""
        process.stdout.close()
        # Stopped as Ctrl-C stops generate.py's other modes: status 130, no traceback.
        assert process.returncode == 130, log.read_text()
        assert "Traceback" not in log.read_text() and log.read_text().endswith("stopping\n"), log.read_text()


@pytest.fixture(scope="module")
def browser():
    need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            yield browser
        finally:
            browser.close()


# Records every distinct value the story box shows, polling it every 5 ms.
WATCH_STORY = """() => {
    const box = document.querySelector('#story textarea');
    window.storyValues = [box.value];
    setInterval(() => {
        const values = window.storyValues;
        if (values[values.length - 1] !== box.value) values.push(box.value);
    }, 5);
}"""


def open_page(browser, url: str):
    page = browser.new_page()
    page.set_default_timeout(60_000)
    page.requested = []
    page.on("request", lambda request: page.requested.append(request.url))
    page.goto(url)
    page.wait_for_selector("#story textarea")
    return page


def test_page_streams_the_greedy_story_of_the_cli(cli_greedy, server, browser):
    page = open_page(browser, server)
    try:
        assert page.input_value("#prompt textarea") == WIDGET_PROMPT  # the published card's widget text
        page.fill("#prompt textarea", "")
        page.locator("#prompt textarea").press_sequentially(PROMPT)
        page.fill("#max-new-tokens input[type=number]", str(MAX_NEW))
        page.check("#greedy input")
        page.evaluate(WATCH_STORY)
        page.click("#generate")
        expected = cli_greedy
        # Partial stories are shorter than the final one; a wrong story of the right length fails below.
        page.wait_for_function("n => document.querySelector('#story textarea').value.length >= n",
                               arg=len(expected), timeout=120_000)
        values = page.evaluate("window.storyValues")
        # The page works offline: everything it loads (fonts too) comes from the server itself.
        elsewhere = [url for url in page.requested if not url.startswith((server, "data:", "blob:"))]
    finally:
        page.close()
    assert elsewhere == []
    assert values[-1] == expected
    assert values[0] == ""
    # Streamed: the box grew through at least two partial stories before the final one, each the
    # start of the final text.
    partial = [value for value in values[1:-1] if value]
    assert len(partial) >= 2, values
    assert all(expected.startswith(value) for value in partial), values
    assert [len(value) for value in partial] == sorted({len(value) for value in partial})


def test_bad_settings_show_an_error_in_the_page(server, browser):
    page = open_page(browser, server)
    try:
        page.fill("#seed input, #seed textarea", "abc")
        page.click("#generate")
        error = page.get_by_text("seed must be a whole number")
        error.first.wait_for(state="visible", timeout=60_000)
        assert "'abc'" in error.first.inner_text()
        assert page.input_value("#story textarea") == ""
    finally:
        page.close()


@pytest.mark.parametrize("sent, words", [
    ({"top_k": -5}, '"top k" must be'),  # out of the page's range: the page's own check, naming the setting
    ({"top_p": 1.5}, '"top p" must be in (0, 1]'),
    ({"temperature": 0}, '"temperature" must be a finite number above 0'),
    ({"max_new_tokens": None}, '"max new tokens" must be a number, got None'),
])
def test_a_script_sending_bad_settings_gets_the_pages_error_and_the_server_stays_quiet(server, server_log, sent,
                                                                                    words):
    need("gradio_client")
    from gradio_client import Client

    client = Client(server, verbose=False)
    with pytest.raises(Exception, match=re.escape(words)):
        client.predict(prompt=PROMPT, **{"max_new_tokens": 5, **sent}, api_name="/generate")
    assert "Traceback" not in server_log.read_text()


def test_api_matches_the_cli_and_users_wait_their_turn(cli_greedy, server):
    need("gradio_client")
    from gradio_client import Client

    client = Client(server, verbose=False)
    greedy = {"max_new_tokens": MAX_NEW, "greedy": True, "api_name": "/generate"}
    short_greedy = {**greedy, "max_new_tokens": 40}
    sampled = {"prompt": OTHER_PROMPT, "max_new_tokens": 40, "seed": "7", "api_name": "/generate"}
    # Three users at once: the queue runs them one after another, each gets its own story.
    jobs = [client.submit(prompt=PROMPT, **greedy), client.submit(prompt=OTHER_PROMPT, **short_greedy),
            client.submit(**sampled)]
    results = [job.result(timeout=180) for job in jobs]
    assert results[0] == cli_greedy
    assert results[1] == client.predict(prompt=OTHER_PROMPT, **short_greedy)
    assert results[1].startswith(OTHER_PROMPT) and len(results[1]) > len(OTHER_PROMPT)
    assert results[2].startswith(OTHER_PROMPT) and len(results[2]) > len(OTHER_PROMPT)
    assert client.predict(**sampled) == results[2]  # same seed, same story, whoever came first
    assert client.predict(**{**sampled, "seed": "8"}) != results[2]


def test_serve_without_gradio_is_one_line(story_model):
    # gradio made unimportable in this process only: what a core install without the extra sees.
    code = ("import runpy, sys; sys.modules['gradio'] = None; "
            f"sys.argv = ['generate.py', '--serve', '--model', {str(story_model)!r}]; "
            "runpy.run_path('generate.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"error: {MISSING_GRADIO}\n"
    assert MISSING_GRADIO == '--serve needs gradio: pip install -e ".[demo]"'
    assert result.stdout == ""


@pytest.mark.parametrize("args, words", [
    ([], "give a PROMPT"),
    (["--serve", "one", "two"], "at most one PROMPT"),
    (["--serve", "--num-return-sequences", "2"], "--num-return-sequences"),
])
def test_prompt_rules_are_one_line(capsys, args, words):
    # In-process: these are refused before anything loads.
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: generate_cli.main(["--model", "unused", *args]))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines


def test_a_taken_port_is_one_line(monkeypatch, tokenizer, story_model):
    need("gradio")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # restored afterwards, unlike serve's own default
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    model, _ = load_model(story_model)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port}: the port is in use") as error:
            serve(StoryGenerator(model.eval(), tokenizer), "127.0.0.1", port)
    assert "--port" in str(error.value) and "\n" not in str(error.value)


def test_a_port_out_of_range_is_one_line(capsys, model_folder):
    need("gradio")  # --serve asks for it before the model loads
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: generate_cli.main(["--serve", "--model", str(model_folder), "--port", "70000"]))
    assert stop.value.code == 2
    # Before the model loads: the only line.
    assert capsys.readouterr().err == "error: --port must be from 1 to 65535, got 70000\n"


def test_the_seed_box_takes_whole_numbers_as_any_client_sends_them():
    from gpt2kids.serve import _seed

    assert [_seed(text) for text in ("", "  ", None, "7", " 7.0 ", "1e3")] == [None, None, None, 7, 7, 1000]
    # Exact, however long: float() would round 2**53 + 1, a valid seed, to 2**53, and the next one to
    # 12345678901234567168 (which stream_story then refuses, past 2**63 - 1, naming another number).
    assert [_seed(text) for text in ("9007199254740993", "12345678901234567890")] == [2**53 + 1, 12345678901234567890]
    for text in ("abc", "7.5", "nan"):
        with pytest.raises(UserError, match="seed must be a whole number"):
            _seed(text)


def test_an_address_not_of_this_machine_is_one_line_at_once(capfd, tokenizer, story_model):
    model, _ = load_model(story_model)
    start = time.monotonic()
    with pytest.raises(UserError, match="cannot serve on 192.0.2.1:7861: .* not one of this machine's"):
        serve(StoryGenerator(model.eval(), tokenizer), "192.0.2.1", 7861)  # TEST-NET-1: never a local address
    assert time.monotonic() - start < 5
    assert capfd.readouterr().err == ""  # no line of the web server's own


# --- the stream, in-process (no gradio needed) ---------------------------------------------------

@pytest.fixture
def byte_tokenizer() -> Tokenizer:
    return Tokenizer.train(SAMPLE_TEXTS, vocab_size=257)  # no merges: one token per byte


@pytest.fixture
def small_model(byte_tokenizer) -> GPT2:
    config = GPT2Config(vocab_size=byte_tokenizer.vocab_size, n_positions=64, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=byte_tokenizer.eos_id, eos_token_id=byte_tokenizer.eos_id)
    return GPT2(config).eval()


def test_stream_grows_and_never_shows_half_a_character(monkeypatch, byte_tokenizer, small_model):
    story = " Roket 🚀 terbang ke Mars"
    ids = byte_tokenizer.encode(story)

    def fake_generate(model, prompts, settings, eos_id, generator=None, on_tokens=None, **options):
        for token in ids:  # one byte a step, so the rocket arrives in four pieces
            on_tokens([token])
            time.sleep(0.002)
        on_tokens([None])
        return [ids]

    monkeypatch.setattr("gpt2kids.text_generation.generate", fake_generate)
    shown = list(stream_story(StoryGenerator(small_model, byte_tokenizer), "Archie:", SamplingSettings(greedy=True)))
    assert shown[-1] == "Archie:" + story
    assert all("\ufffd" not in text and shown[-1].startswith(text) for text in shown)
    assert len(shown) >= 2 and len(set(shown)) == len(shown)


def test_closing_the_stream_stops_the_decode(monkeypatch, byte_tokenizer, small_model):
    steps, ran_out = [], []

    def endless_generate(model, prompts, settings, eos_id, generator=None, on_tokens=None, **options):
        deadline = time.monotonic() + 10  # a worker the stream fails to stop fails the test, not hangs it
        while time.monotonic() < deadline:
            steps.append(1)
            on_tokens([byte_tokenizer.encode("a")[0]])
            time.sleep(0.001)
        ran_out.append(True)

    monkeypatch.setattr("gpt2kids.text_generation.generate", endless_generate)
    stream = stream_story(StoryGenerator(small_model, byte_tokenizer), "", SamplingSettings(greedy=True))
    next(stream)
    stream.close()  # what gradio does when the page goes away
    taken = len(steps)
    time.sleep(0.05)
    assert len(steps) == taken and not ran_out  # the worker stopped with the stream
    assert not any(thread.name == "gpt2kids-decode" for thread in threading.enumerate())


def test_real_decode_streams_the_greedy_tokens(byte_tokenizer, small_model):
    from gpt2kids.decode_loop import generate

    settings = SamplingSettings(max_new_tokens=12, greedy=True)
    shown = list(stream_story(StoryGenerator(small_model, byte_tokenizer), "Budi", settings))
    new = generate(small_model, [byte_tokenizer.encode("Budi")], settings, byte_tokenizer.eos_id)[0]
    assert shown[-1] == "Budi" + byte_tokenizer.decode(new)


def test_a_prompt_too_long_for_the_context_keeps_its_end_with_a_warning(byte_tokenizer, small_model):
    warnings: list[str] = []
    settings = SamplingSettings(max_new_tokens=4, greedy=True)
    shown = list(stream_story(StoryGenerator(small_model, byte_tokenizer), "x" * 100, settings, warn=warnings.append))
    assert warnings == ["prompt 1 has 100 tokens; with --max-new-tokens 4 and a context of 64 only its last 61 "
                        "are used"]
    assert shown[-1].startswith("x" * 100)


@pytest.mark.parametrize("settings, seed, words", [
    (SamplingSettings(temperature=0), None, "--greedy"),
    (SamplingSettings(top_p=0), None, "--top-p"),
    (SamplingSettings(), -1, "seed must be"),
    (SamplingSettings(), 2**63, "seed must be"),
])
def test_bad_settings_are_user_errors(byte_tokenizer, small_model, settings, seed, words):
    with pytest.raises(UserError, match=words):
        next(stream_story(StoryGenerator(small_model, byte_tokenizer), "Halo", settings, seed))


def test_the_page_stops_at_every_end_id_of_the_model(byte_tokenizer, small_model):
    from gpt2kids.decode_loop import generate

    settings = SamplingSettings(max_new_tokens=12, greedy=True, no_repeat_ngram_size=1)  # no token twice
    new = generate(small_model, [byte_tokenizer.encode("Budi")], settings, byte_tokenizer.eos_id)[0]
    assert len(new) == 12
    stop = 3
    story = StoryGenerator(small_model, byte_tokenizer, (new[stop],))  # as loaded from a generation_config list
    assert list(stream_story(story, "Budi", settings))[-1] == "Budi" + byte_tokenizer.decode(new[:stop])


def test_generate_py_serves_the_model_with_its_end_ids(monkeypatch, model_folder, tmp_path):
    import shutil

    import gpt2kids.serve

    need("gradio")
    folder = shutil.copytree(model_folder, tmp_path / "model")
    settings = json.loads((folder / "generation_config.json").read_text())
    settings["eos_token_id"] = [settings["eos_token_id"], 7]
    (folder / "generation_config.json").write_text(json.dumps(settings))
    served = []
    monkeypatch.setattr(gpt2kids.serve, "check_address", lambda host, port: None)
    monkeypatch.setattr(gpt2kids.serve, "serve", lambda story, *args, **page: served.append(story))
    assert generate_cli.main(["--serve", "--model", str(folder), "--precision", "fp32"]) == 0
    assert served[0].end_ids == (settings["eos_token_id"][0], 7)


def test_the_sliders_start_at_the_command_lines_values_and_offer_no_value_always_refused(byte_tokenizer,
                                                                                        small_model):
    need("gradio")
    story = StoryGenerator(small_model, byte_tokenizer)
    app = build_app(story, defaults=SamplingSettings(max_new_tokens=1000))  # beyond the context of 64
    sliders = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
    # Past the context the prompt is kept (as on the command line); up to it, cut to make room.
    assert (sliders["max-new-tokens"].value, sliders["max-new-tokens"].maximum) == (1000, 1000)
    assert sliders["temperature"].minimum > 0 and sliders["top-p"].minimum > 0
    assert sliders["top-k"].minimum == 0  # 0 is top-k off
    import gpt2kids.serve

    assert not Path(gpt2kids.serve.__file__).with_suffix(".pyi").exists()  # gradio writes one for a subclass


def test_the_page_names_its_settings_and_leaves_the_servers_flags_as_flags():
    from gpt2kids.serve import _for_the_page

    assert _for_the_page("--top-k must be >= 0; or --greedy") == '"top k" must be >= 0; or "greedy"'
    assert _for_the_page("overflow in this precision; try --precision fp32") == (
        "overflow in this precision; try --precision fp32")
