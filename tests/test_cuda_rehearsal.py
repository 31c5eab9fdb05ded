"""tests/test_cuda.py, rehearsed on the CPU.

The CUDA tests are deselected on CPU machines, so nothing else would notice when the package changes
under them (a renamed function, a new argument) until a GPU is lent, and a lent GPU's minutes are few.
Here every one of them runs on the CPU (GPT2KIDS_CUDA_TESTS_ON=cpu), in its own pytest process; that
shows the tests still fit the package, not how a GPU computes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO


def test_every_cuda_test_runs_and_passes_when_rehearsed_on_the_cpu():
    env = {**os.environ, "GPT2KIDS_CUDA_TESTS_ON": "cpu"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-m", "cuda", "-p", "no:cacheprovider",
                             "-q", "-rs", "tests/test_cuda.py"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # Nothing skipped (no bf16 switch, no missing GPU): a rehearsal that skips would prove nothing.
    assert re.fullmatch(r"\d+ passed in [\d.]+s( \(.*\))?", summary), summary
