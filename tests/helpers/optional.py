"""Optional packages in tests: skipped where they are not installed, required where CI installs them.

``SFPO_REQUIRE`` (comma-separated, e.g. ``verl``; ``.ci/run`` sets it, and
``.ci/vllm-cpu`` sets ``vllm``) names the packages CI installs: for those a
missing package fails the test instead of skipping it, so CI cannot pass with
the verl or vLLM tests silently skipped.
"""

from __future__ import annotations

import importlib
import os

import pytest


def import_or_skip(name: str):
    """The module ``name``; skips the test without it, unless ``SFPO_REQUIRE`` lists it (then it fails)."""
    if name in os.environ.get("SFPO_REQUIRE", "").split(","):
        return importlib.import_module(name)
    return pytest.importorskip(name)
