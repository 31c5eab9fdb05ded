"""`tensorboard --logdir runs` shows what a run logged: read back through TensorBoard's own HTTP API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from conftest import run_train

from gpt2kids.training import SAMPLE_PROMPT

STARTUP_SECONDS = 60  # TensorBoard imports, then loads the event files in the background


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(base: str, route: str, **query: str) -> object:
    url = f"{base}{route}?{urllib.parse.urlencode(query)}" if query else f"{base}{route}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_until_loaded(server: subprocess.Popen, log: Path, base: str, run: str, counts: dict[str, int],
                      text_tag: str) -> None:
    """Poll until TensorBoard serves `counts[tag]` scalars of each tag and a `text_tag` text for `run` (it
    loads files in the background, possibly part of a file at a time), within a bounded time."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if server.poll() is not None:
            raise AssertionError(f"tensorboard exited with status {server.returncode}: {log.read_text()[-2000:]}")
        try:
            if run in get_json(base, "/data/runs") and all(
                    len(get_json(base, "/data/plugin/scalars/scalars", run=run, tag=tag)) >= count
                    for tag, count in counts.items()) and get_json(
                    base, "/data/plugin/text/text", run=run, tag=text_tag, markdown="false"):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass  # not listening yet, or the tag not loaded yet (an HTTP error status)
        if time.monotonic() > deadline:
            raise AssertionError(f"tensorboard did not serve {run}'s {sorted(counts)} within {STARTUP_SECONDS} s: "
                                 f"{log.read_text()[-2000:]}")
        time.sleep(0.25)


def as_float32(values: list[float]) -> np.ndarray:
    # Event files hold float32; one server may print it as a double, another as the shortest float32
    # decimal. Both name the same float32, so compare as float32, exactly.
    return np.asarray(values, dtype=np.float32)


def test_tensorboard_serves_the_runs_scalars_and_sample(tmp_path, init_folder, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.text.text_plugin import text_array_to_html

    runs = tmp_path / "runs"
    result = run_train("--init", str(init_folder), "--data", str(corpus), "--epochs", "1", "--batch-size", "4",
                       "--block-size", "64", "--precision", "fp32", "--device", "cpu", "--out", str(runs / "run"))
    assert result.returncode == 0, result.stderr

    logged = EventAccumulator(str(runs / "run"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    expected = {tag: [(event.step, event.value) for event in logged.Scalars(tag)]
                for tag in ("train/loss", "eval/loss")}
    assert len(expected["train/loss"]) >= 2 and len(expected["eval/loss"]) == 1
    [sample_event] = logged.Tensors("sample/text_summary")
    sample = sample_event.tensor_proto.string_val[0].decode("utf-8")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tensorboard = Path(sys.executable).parent / "tensorboard"
    log = tmp_path / "tensorboard.log"  # a file, not a pipe: nothing reads it while the server runs
    with log.open("w") as log_file:
        server = subprocess.Popen([str(tensorboard), "--logdir", str(runs), "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_until_loaded(server, log, base, "run", {tag: len(points) for tag, points in expected.items()},
                          "sample/text_summary")
        for tag, points in expected.items():
            served = get_json(base, "/data/plugin/scalars/scalars", run="run", tag=tag)  # [[wall_time, step, value]]
            assert [step for _, step, _ in served] == [step for step, _ in points], tag
            np.testing.assert_array_equal(as_float32([value for _, _, value in served]),
                                          as_float32([value for _, value in points]), err_msg=tag)

        assert "sample/text_summary" in get_json(base, "/data/plugin/text/tags")["run"]
        [served_text] = get_json(base, "/data/plugin/text/text", run="run", tag="sample/text_summary",
                                 markdown="false")
        assert served_text["step"] == sample_event.step == expected["eval/loss"][0][0]
        # Without markdown the plugin serves the logged string as a one-cell HTML table, sanitized (control
        # characters, which a tiny random model's sample has, become "?"): the plugin's own rendering of it.
        assert served_text["text"] == text_array_to_html(np.array([sample.encode("utf-8")]), enable_markdown=False)
        assert served_text["text"].startswith("<table>") and SAMPLE_PROMPT in served_text["text"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
