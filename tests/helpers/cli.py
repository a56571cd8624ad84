"""Run the ``sfpo`` command line as a user would: a fresh interpreter, no standard input."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """``python -m sfpo_train.cli ARGS`` with captured text output (10 minutes at most)."""
    return subprocess.run(
        [sys.executable, "-m", "sfpo_train.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
