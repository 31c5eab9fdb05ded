"""How generated stories are printed: streamed text, or one JSON record per sequence."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TextIO

from gpt2kids.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding gives for a UTF-8 character whose bytes have not all arrived


def whole_characters(tokenizer: Tokenizer, ids: Sequence[int], final: bool) -> str | None:
    """The text of `ids`, or None while it ends inside a multi-byte UTF-8 character (unless `final`)."""
    text = tokenizer.decode(ids)
    if not final and text.endswith(REPLACEMENT):
        return None
    return text


class TextStream:
    """A `StepCallback` that prints each row's prompt and text in order: the current row streams, later
    rows wait their turn. It never prints half a character (see `whole_characters`)."""

    def __init__(self, tokenizer: Tokenizer, prompts: Sequence[str], out: TextIO) -> None:
        self.tokenizer = tokenizer
        self.prompts = prompts  # one per output row
        self.out = out
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.done = [False] * len(prompts)
        self.current = 0
        self.printed = ""  # the current row's text printed so far
        out.write(prompts[0])
        out.flush()

    def __call__(self, new: Sequence[int | None]) -> None:
        for row, token in enumerate(new):
            if token is None:
                self.done[row] = True
            else:
                self.tokens[row].append(token)
        while self.current < len(self.prompts):
            done = self.done[self.current]
            text = whole_characters(self.tokenizer, self.tokens[self.current], final=done)
            # A prefix that decodes to whole characters stays a prefix (UTF-8 resynchronises); the
            # startswith check only guards against a tokenizer that rewrites earlier text.
            if text is not None and (text.startswith(self.printed) or done):
                self.out.write(text[len(self.printed):])
                self.printed = text
            if not done:
                break
            self.out.write("\n")
            self.current += 1
            self.printed = ""
            if self.current < len(self.prompts):
                self.out.write("\n" + self.prompts[self.current])  # a blank line between sequences
        self.out.flush()

    def finish(self) -> None:
        """Print whatever is left once generation has stopped (the length limit reached)."""
        self([None] * len(self.prompts))


def write_jsonl(tokenizer: Tokenizer, prompts: Sequence[str], completions: Sequence[Sequence[int]],
                out: TextIO) -> None:
    """One `{"prompt", "completion", "text", "new_tokens"}` object per sequence (one prompt per row)."""
    for prompt, ids in zip(prompts, completions, strict=True):
        completion = tokenizer.decode(ids)
        record = {"prompt": prompt, "completion": completion, "text": prompt + completion, "new_tokens": len(ids)}
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()
