"""How generated stories are printed: streamed text, or one JSON record per sequence."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TextIO

from gpt2kids.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding gives for a UTF-8 character whose bytes have not all arrived


def whole_characters(tokenizer: Tokenizer, ids: Sequence[int], final: bool) -> str | None:
    """The text of `ids`, or None while it ends inside a multi-byte UTF-8 character (unless `final`)."""
    text = tokenizer.decode(list(ids))
    if not final and text.endswith(REPLACEMENT):
        return None
    return text


class TextStream:
    """Prints sequences in order: the current one streams, later ones wait until it is done.

    Decoding is incremental but never prints half a character: a prefix whose decoding ends in
    U+FFFD is still waiting for the rest of a multi-byte UTF-8 character.
    """

    def __init__(self, tokenizer: Tokenizer, prompts: Sequence[str], out: TextIO) -> None:
        self.tokenizer = tokenizer
        self.prompts = prompts  # one per output row
        self.out = out
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.done = [False] * len(prompts)
        self.current = 0
        self.printed = ""  # the current row's completion text printed so far
        self._start_row()

    def _start_row(self) -> None:
        if self.current > 0:
            self.out.write("\n")  # a blank line between sequences
        self.out.write(self.prompts[self.current])
        self.out.flush()

    def _emit(self, final: bool) -> None:
        text = whole_characters(self.tokenizer, self.tokens[self.current], final)
        if text is None:
            return
        # A prefix that decodes to whole characters stays a prefix (UTF-8 resynchronises), so
        # the check below only guards against a tokenizer that rewrites earlier text.
        if text.startswith(self.printed) or final:
            self.out.write(text[len(self.printed):])
            self.printed = text
        self.out.flush()

    def __call__(self, new: list[int | None]) -> None:
        for row, token in enumerate(new):
            if token is None:
                self.done[row] = True
            else:
                self.tokens[row].append(token)
        self._advance()

    def _advance(self) -> None:
        while self.current < len(self.prompts):
            self._emit(final=self.done[self.current])
            if not self.done[self.current]:
                return
            self.out.write("\n")
            self.out.flush()
            self.current += 1
            if self.current < len(self.prompts):
                self.printed = ""
                self._start_row()

    def finish(self) -> None:
        """Print whatever is left once generation has stopped (length limit reached)."""
        self.done = [True] * len(self.done)
        self._advance()


def write_jsonl(tokenizer: Tokenizer, prompts: Sequence[str], completions: Sequence[Sequence[int]],
                out: TextIO) -> None:
    """One `{"prompt", "completion", "text", "new_tokens"}` object per sequence (one prompt per row)."""
    for prompt, ids in zip(prompts, completions, strict=True):
        completion = tokenizer.decode(list(ids))
        record = {"prompt": prompt, "completion": completion, "text": prompt + completion, "new_tokens": len(ids)}
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()
