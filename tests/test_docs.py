"""No tracked file cites the design notes that stay outside the repository (the math is in docs/conventions.md)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the files git tracks)")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_file_cites_a_design_document_the_repository_does_not_ship():
    """The math and the targets live in docs/conventions.md; a citation of DESIGN.md points nowhere."""
    assert not (ROOT / "DESIGN.md").exists()
    assert (ROOT / "docs" / "conventions.md").is_file()
    citing = []
    for path in tracked_files():
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images, parquet, weights
            continue
        citing += [
            f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(text.splitlines(), 1) if "DESIGN.md" in line
        ]
    assert not citing, "cite docs/conventions.md instead of DESIGN.md at " + ", ".join(citing)
