"""`python generate.py --serve`: a local web page to try a model, like the hub's inference widget.

The page is a gradio app (what model demos on the hub are built with), so it also runs as a Space.
gradio is an optional extra (`pip install -e ".[demo]"`), imported only when a page is built. The model
is loaded once and shared; one story is decoded at a time (a decode step already uses every core, so
two side by side would each run at half speed): requests wait in gradio's queue instead.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

from gpt2kids.errors import UserError
from gpt2kids.errors import warn as warn_on_stderr
from gpt2kids.logits_processors import SamplingSettings
from gpt2kids.model_card import WIDGET_PROMPT  # the published card's widget prompt
from gpt2kids.text_generation import StoryGenerator
from gpt2kids.text_output import whole_characters

if TYPE_CHECKING:
    import gradio

API_NAME = "generate"  # the endpoint: POST /gradio_api/call/generate, or gradio_client's api_name="/generate"
MISSING_GRADIO = '--serve needs gradio: pip install -e ".[demo]"'
_DECODE_LOCK = threading.Lock()  # one decode at a time in this process, whatever the queue's settings
_DONE = object()


def require_gradio() -> gradio:
    """Import gradio with the phone-home calls off, or raise `UserError` saying how to install it."""
    # gradio calls out to the internet when a Blocks is built (a version check) and launched (usage
    # analytics) unless analytics are off: build_app turns them off for its Blocks, the variable for
    # anything else gradio builds. huggingface_hub's telemetry goes off too.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio
    except ModuleNotFoundError as error:
        if error.name == "gradio":
            raise UserError(MISSING_GRADIO) from None
        raise UserError(f'--serve needs gradio, which failed to import ({error}); reinstall it: '
                        'pip install -e ".[demo]"') from None
    return gradio


class _Cancelled(Exception):
    """Raised inside the decode loop's callback when nobody reads the story any more."""


def stream_story(story: StoryGenerator, prompt: str, settings: SamplingSettings, seed: int | None = None,
                 warn: Callable[[str], None] = warn_on_stderr) -> Iterator[str]:
    """Yield the prompt and its continuation so far as tokens are decoded; the last one is final.

    Bad settings or prompts raise `UserError`. Only the final text may end in half a UTF-8 character.
    The story is decoded in a worker thread; closing the iterator stops it after the current step.
    """
    settings = replace(settings, num_return_sequences=1)
    settings.validate()
    ids = story.encode([prompt], settings.max_new_tokens, warn)
    generator = story.random_numbers(seed)  # a bad seed is refused here, before the worker starts
    updates: queue.Queue[object] = queue.Queue()
    stop = threading.Event()

    def on_tokens(new: list[int | None]) -> None:
        if stop.is_set():
            raise _Cancelled
        updates.put(new[0])

    def work() -> None:
        try:
            with _DECODE_LOCK:
                story.decode(ids, settings, generator, on_tokens)
        except _Cancelled:
            pass
        except BaseException as error:  # handed to the reading thread, which raises it
            updates.put(error)
        finally:
            updates.put(_DONE)

    worker = threading.Thread(target=work, name="gpt2kids-decode", daemon=True)
    worker.start()
    tokens: list[int] = []
    shown = None
    done = False
    try:
        while not done:
            items = [updates.get()]
            while not updates.empty():  # one page update for every token that arrived meanwhile
                items.append(updates.get_nowait())
            for item in items:
                if isinstance(item, BaseException):
                    raise item
                done = done or item is _DONE
                if isinstance(item, int):
                    tokens.append(item)
            text = whole_characters(story.tokenizer, tokens, final=done)
            if text is not None and text != shown:
                shown = text
                yield prompt + text
    finally:
        stop.set()
        worker.join()


# The command line's flags that are settings on the page; others (--precision) stay flags of the server.
PAGE_SETTINGS = ("max-new-tokens", "temperature", "top-k", "top-p", "repetition-penalty", "no-repeat-ngram-size",
                 "greedy", "seed")


def _for_the_page(message: str) -> str:
    """A `UserError` line with the CLI's flag names turned into the page's setting names."""
    return re.sub(r"--(" + "|".join(PAGE_SETTINGS) + r")\b", lambda flag: f'"{flag.group(1).replace("-", " ")}"',
                  message)


def _number(value: object, name: str) -> float:
    """A setting as a client sent it (the page's sliders keep to their ranges; a script's values need not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} must be a number, got {value!r}")
    return float(value)


def _whole(value: object, name: str) -> int:
    number = _number(value, name)
    if number != int(number):
        raise UserError(f"{name} must be a whole number, got {value}")
    return int(number)


def _seed(text: str | None) -> int | None:
    """The seed box's value (gradio hands the page's and API clients' values over as text): empty for none, else
    a whole number, "7.0" included."""
    if text is None or not text.strip():
        return None
    with contextlib.suppress(ValueError):  # exact, however long: float() would round it
        return int(text)
    try:
        return _whole(float(text), "seed")
    except (ValueError, UserError):
        raise UserError("seed must be a whole number (or empty: a different story each time), "
                        f"got {text.strip()!r}") from None


def build_app(story: StoryGenerator, *, model_name: str = "", prompt: str = WIDGET_PROMPT,
              defaults: SamplingSettings | None = None, seed: int | None = None) -> gradio.Blocks:
    """The page: a prompt box, the sampling settings (starting at `defaults` and `seed`), the story as it grows.

    `app.launch()` serves it, as `serve` does or a Space's app.py.
    """
    gr = require_gradio()
    defaults = defaults or SamplingSettings()
    context = story.model.config.n_positions

    def tell(prompt: str, max_new_tokens: float, temperature: float, top_k: float, top_p: float,
             repetition_penalty: float, no_repeat_ngram_size: float, greedy: bool,
             seed: str | None) -> Iterator[str]:
        try:
            settings = SamplingSettings(
                max_new_tokens=_whole(max_new_tokens, '"max new tokens"'),
                temperature=_number(temperature, '"temperature"'), top_k=_whole(top_k, '"top k"'),
                top_p=_number(top_p, '"top p"'), repetition_penalty=_number(repetition_penalty, '"repetition penalty"'),
                no_repeat_ngram_size=_whole(no_repeat_ngram_size, '"no repeat ngram size"'), greedy=bool(greedy))
            yield from stream_story(story, prompt, settings, _seed(seed),
                                    warn=lambda message: gr.Warning(_for_the_page(message)))
        except UserError as error:
            raise gr.Error(_for_the_page(str(error)), print_exception=False) from None

    def slider(low: float, high: float, value: float, step: float, name: str, note: str = "") -> gradio.Slider:
        # The range widens to take a start value given on the command line.
        component = gr.Slider(min(low, value), max(high, value), value=value, step=step, label=name + note,
                              elem_id=name.replace(" ", "-"))
        # Values reach `tell` as sent, which checks them all: gradio's own range check names no setting and
        # prints a traceback on the server for every script that sends a value out of range. (On the instance:
        # a subclass of a gradio component makes gradio write a .pyi file beside this module.)
        component.preprocess = lambda payload: payload
        return component

    name = model_name or "a GPT-2 model"
    with gr.Blocks(title="gpt2kids: a story", analytics_enabled=False) as app:
        gr.Markdown(f"## gpt2kids\nContinue a children's story with {name} "
                    f"({story.model.config.n_layer} layers, a context of {context} tokens).")
        with gr.Row():
            with gr.Column():
                prompt_box = gr.Textbox(value=prompt, label="Prompt", lines=3,
                                        placeholder="Leave it empty to start a new story", elem_id="prompt")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("Settings", open=True):
                    # Up to the context (a prompt keeps its last tokens to make room), or the command line's
                    # larger value (the prompt is kept and the story stops when the context is full).
                    max_new_tokens = slider(1, context, defaults.max_new_tokens, 1, "max new tokens")
                    greedy = gr.Checkbox(value=defaults.greedy, label="greedy (argmax: same prompt, same story; "
                                         "temperature, top-k and top-p do nothing)", elem_id="greedy")
                    # From one step above 0: neither takes 0.
                    temperature = slider(0.05, 2, defaults.temperature, 0.05, "temperature")
                    top_k = slider(0, 200, defaults.top_k, 1, "top-k", " (0: off)")
                    top_p = slider(0.01, 1, defaults.top_p, 0.01, "top-p", " (1: off)")
                    repetition_penalty = slider(0.5, 2, defaults.repetition_penalty, 0.05, "repetition penalty",
                                                " (1: off)")
                    no_repeat = slider(0, 10, defaults.no_repeat_ngram_size, 1, "no repeat n-gram size", " (0: off)")
                    # A text box, not gr.Number: an empty number box shows (and may send) 0.
                    seed_box = gr.Textbox(value="" if seed is None else str(seed), label="seed", max_lines=1,
                                          placeholder="empty: a different story each time", elem_id="seed")
            with gr.Column():
                story_box = gr.Textbox(label="Story", lines=16, max_lines=40, interactive=False, buttons=["copy"],
                                       elem_id="story")
        button.click(tell, inputs=[prompt_box, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                   no_repeat, greedy, seed_box],
                     outputs=story_box, api_name=API_NAME, concurrency_limit=1)  # others wait in the queue
    return app


def _cannot_serve(host: str, port: int) -> UserError:
    return UserError(f"cannot serve on {host}:{port}: the port is in use, or the address is not one of this "
                     "machine's; pass another --port or --host")


def check_address(host: str, port: int) -> None:
    """Raise `UserError` unless a server can listen on host:port now: generate.py asks before the model loads.
    By hand, since gradio finds out after seconds of retries, and its server logs a line of its own."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be from 1 to 65535, got {port}")
    try:
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError:
        raise _cannot_serve(host, port) from None


def serve(story: StoryGenerator, host: str = "127.0.0.1", port: int = 7860, **page: object) -> None:
    """Serve `build_app(story, **page)` on http://host:port until Ctrl-C."""
    check_address(host, port)
    app = build_app(story, **page)
    try:
        # Nothing leaves this machine: no share link, no server-side rendering (a Node process),
        # no browser opened; quiet, because stdout is for generated text only.
        _, url, _ = app.launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
                               quiet=True, prevent_thread_lock=True)
    except OSError:  # taken in the meantime
        raise _cannot_serve(host, port) from None
    print(f"serving {url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    try:
        while app.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
        raise SystemExit(130) from None  # as Ctrl-C ends generate.py's other modes
    finally:
        app.close(verbose=False)  # gradio would say so on stdout, which holds generated text only
