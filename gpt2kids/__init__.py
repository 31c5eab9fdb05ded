"""gpt2kids: a from-scratch GPT-2 for fine-tuning on Indonesian children's stories."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpt2kids.config import GPT2Config
    from gpt2kids.errors import UserError
    from gpt2kids.model import GPT2

__all__ = ["GPT2", "GPT2Config", "UserError"]
__version__ = "0.1.0"
_HOMES = {"GPT2": "gpt2kids.model", "GPT2Config": "gpt2kids.config", "UserError": "gpt2kids.errors"}


def __getattr__(name: str) -> Any:
    """`gpt2kids.GPT2` and the rest, imported on first use: the package itself does not import torch, so that a
    command (`python -m gpt2kids.evaluate`) can set up its Ctrl-C before torch's import, a second or so."""
    if name in _HOMES:
        value = globals()[name] = getattr(importlib.import_module(_HOMES[name]), name)  # found once
        return value
    raise AttributeError(f"module 'gpt2kids' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
