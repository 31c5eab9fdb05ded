"""The package's face (gpt2kids/__init__.py): its names, and that importing it leaves torch unloaded."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_import_gpt2kids_does_not_import_torch_and_its_names_load_on_first_use():
    # A command sets up its quiet Ctrl-C after `import gpt2kids` and before torch's import (see cli.py).
    code = ("import sys, gpt2kids; assert 'torch' not in sys.modules, 'torch imported'; "
            "from gpt2kids import GPT2, GPT2Config, UserError; import gpt2kids.model; "
            "assert GPT2 is gpt2kids.model.GPT2 and gpt2kids.GPT2 is GPT2; "
            "assert {'GPT2', 'GPT2Config', 'UserError'} <= set(dir(gpt2kids)); "
            "from gpt2kids import *; print(sorted(gpt2kids.__all__))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['GPT2', 'GPT2Config', 'UserError']"
