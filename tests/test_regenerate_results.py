"""scripts/regenerate_results.py: its blocks are in the docs, --dry-run runs nothing, and its cheapest stage
(the fused LM-head loss timing, --quick) writes a CSV, the provenance beside it and the document's block."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "regenerate_results.py"
BLOCK = re.compile(r"<!-- generated:linear-loss-cpu -->\n(.*?)<!-- /generated:linear-loss-cpu -->", re.S)


def regenerate(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def test_every_block_the_stages_declare_is_in_its_document_once():
    done = regenerate("--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_names_a_block_missing_from_a_copy(tmp_path):
    (tmp_path / "docs").mkdir()
    text = (ROOT / "docs" / "linear_loss.md").read_text()
    (tmp_path / "docs" / "linear_loss.md").write_text(text.replace("<!-- /generated:linear-loss-cpu -->", ""))
    done = regenerate("--check", "--only", "linear_loss", "--root", str(tmp_path))
    assert done.returncode == 1
    assert "linear_loss: docs/linear_loss.md: generated block 'linear-loss-cpu'" in done.stdout, done.stdout


def test_dry_run_runs_nothing_and_shows_every_stage(tmp_path):
    work = tmp_path / "work"
    done = regenerate("--dry-run", "--root", str(tmp_path), "--work", str(work))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "[main] $ python -m sfpo_train.cli train trainer.default_local_dir=WORK/main" in out
    assert "[compare] $ python -m sfpo_train.cli compare --out WORK/compare-default --no-progress" in out
    names = re.findall(r"^(\w+): (dry run|skipped: .+)$", out, re.M)
    listed = regenerate("--list").stdout
    assert {n for n, _ in names} == set(re.findall(r"^(\w+) +(?:runs here|skipped here)", listed, re.M))
    assert not work.exists() and not (tmp_path / "docs").exists()  # nothing written
    assert str(tmp_path) not in out  # the work directory is shown as WORK


def test_unknown_stages_and_quick_on_the_checkout_are_refused():
    done = regenerate("--only", "main,nope", "--dry-run")
    assert done.returncode != 0 and "unknown stage(s) ['nope']" in done.stderr
    done = regenerate("--only", "linear_loss", "--quick")
    assert done.returncode == 2 and "--quick" in done.stderr


@pytest.fixture(scope="module")
def linear_loss_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    (root / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "linear_loss.md", root / "docs" / "linear_loss.md")
    done = regenerate("--only", "linear_loss", "--quick", "--root", str(root), "--work", str(root / "work"))
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def test_the_stage_writes_its_csv_and_provenance(linear_loss_run):
    root = linear_loss_run
    with open(root / "docs" / "results" / "linear-loss-cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == ["materialised", "sfpo_fused", "sfpo_fused_c256", "verl_fused_linear"]
    assert all(float(r["median_ms"]) > 0 and r["torch_threads"] == "1" for r in rows)

    prov = json.loads((root / "docs" / "results" / "linear_loss.provenance.json").read_text())
    assert prov["stage"] == "linear_loss" and prov["quick"] is True
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["python"] == sys.version.split()[0]
    assert {"transformers", "triton", "trl", "verl", "vllm"} <= prov["versions"].keys()
    assert prov["device"]["cpus"] >= 1 and prov["device"]["cpu"] and isinstance(prov["device"]["gpus"], list)
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert prov["git"]["revision"] == head and isinstance(prov["git"]["dirty"], bool)
    assert prov["date"] <= prov["finished"]
    (command,) = prov["commands"]
    assert command["command"] == (
        "OMP_NUM_THREADS=1 python bench/measure/measure_linear_loss.py --rounds 2 --csv WORK/linear-loss-cpu.csv"
    )
    assert command["exit_code"] == 0 and command["wall_s"] > 0 and command["cpu_s"] > 0
    assert len(command["load_before"]) == 3 and len(command["load_after"]) == 3
    assert prov["outputs"] == ["docs/results/linear-loss-cpu.csv"]
    assert str(root) not in json.dumps(prov)  # paths of this machine shown as WORK / ROOT / python


def test_the_block_is_rewritten_from_the_csv_and_nothing_else(linear_loss_run):
    original = (ROOT / "docs" / "linear_loss.md").read_text()
    written = (linear_loss_run / "docs" / "linear_loss.md").read_text()
    assert BLOCK.sub("", written) == BLOCK.sub("", original)  # outside the block: unchanged
    block = BLOCK.search(written).group(1)
    assert block != BLOCK.search(original).group(1)
    assert "--quick" in block  # says these numbers measure nothing
    with open(linear_loss_run / "docs" / "results" / "linear-loss-cpu.csv") as f:
        for row in csv.DictReader(f):
            assert (
                f"| {float(row['median_ms']):.1f} | {float(row['min_ms']):.1f} | {float(row['max_ms']):.1f} |" in block
            )
    assert "1 torch thread(s)" in block and f"torch {torch.__version__}" in block


def test_render_only_refuses_a_document_without_its_block_and_leaves_it(linear_loss_run, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(linear_loss_run / "docs" / "results", root / "docs" / "results")
    doc = root / "docs" / "linear_loss.md"
    doc.write_text("# no block here\n")
    done = regenerate("--render-only", "--only", "linear_loss", "--root", str(root))
    assert "not rendered: generated block 'linear-loss-cpu': expected one" in done.stdout, done.stdout
    assert doc.read_text() == "# no block here\n"


def test_an_inline_block_stays_on_its_line(tmp_path):
    """The README's compare times sit inside a sentence: the rendered text replaces the old on that line."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    record = {
        "wall_s": 123.0,
        "cpu_s": 61.0,
        "torch_threads": 1,
        "load_before": [0.4, 0.3, 0.2],
        "load_after": [1.1, 0.5, 0.3],
    }
    prov = {"date": "2027-01-05T10:00:00+00:00", "quick": False, "commands": [record]}
    (results / "small_compare.provenance.json").write_text(json.dumps(prov))
    done = regenerate("--render-only", "--only", "small_compare", "--root", str(tmp_path))
    assert done.returncode == 0 and "README.md#small-compare-time" in done.stdout, done.stdout
    before = (ROOT / "README.md").read_text().splitlines()
    after = (tmp_path / "README.md").read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert len(changed) == 1
    assert (
        "<!-- generated:small-compare-time -->2 min 3 s of wall-clock (61 s of CPU time) with 1 torch thread(s) at "
        "load average 0.4 → 1.1, measured 2027-01-05<!-- /generated:small-compare-time -->"
    ) in changed[0][1]
