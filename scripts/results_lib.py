"""What ``scripts/regenerate_results.py``'s stages share: the stage and command types, the context they run in,
generated blocks in Markdown, and small readers and formatters.

A generated block is the part of a document the script owns::

    <!-- generated:NAME -->
    ...written from docs/results/*.csv and the stage's provenance...
    <!-- /generated:NAME -->

(the opening marker may carry a note after the name; a block may also sit inside one line).
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Command:
    """One command a stage runs: ``argv`` with ``env`` set and ``unset`` removed from the environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()


@dataclass
class Context:
    """Where a regeneration reads and writes: ``root`` holds the documents and ``docs/results``, ``work`` the runs."""

    root: Path
    work: Path
    python: str = sys.executable
    vllm_python: str = sys.executable
    trl_python: str = sys.executable
    quick: bool = False

    def results(self, name: str) -> Path:
        return self.root / "docs" / "results" / name

    def images(self, name: str) -> Path:
        return self.root / "docs" / "images" / name

    def provenance_path(self, stage: str) -> Path:
        return self.results(f"{stage}.provenance.json")

    def provenance(self, stage: str) -> dict:
        """The stage's provenance record; ``ValueError`` naming the file when it is not there."""
        path = self.provenance_path(stage)
        if not path.is_file():
            raise ValueError(f"{path}: no provenance for stage {stage!r}; run it first (--only {stage})")
        return json.loads(path.read_text())

    def sfpo(self, *args: str) -> list[str]:
        """``python -m sfpo_train.cli ARGS``: the ``sfpo`` command of this checkout."""
        return [self.python, "-m", "sfpo_train.cli", *args]

    @property
    def aliases(self) -> dict[str, str]:
        """Paths the records name by placeholders, so no record holds this machine's paths."""
        return {
            self.python: "python",
            self.vllm_python: "python",
            self.trl_python: "python",
            str(self.work): "WORK",
            str(self.root): "ROOT",
            str(REPO_ROOT): ".",
        }


@dataclass(frozen=True)
class Stage:
    """One entry of the regeneration: what it runs, what it writes, which document blocks it renders.

    ``commands(ctx)``: the commands, in order (``--dry-run`` shows them). ``collect(ctx, timed)``: after they
    succeeded, copy or derive the outputs into ``ctx.root``; returns ``(paths written, settings to record)``.
    ``render(ctx)``: ``{(document, block name): Markdown}`` from those outputs and the stage's provenance.
    ``blocks``: the ``document#block`` names ``render`` writes, declared so they can be checked without data.
    ``needs(ctx)``: None when the stage can run here, else why it is skipped (no GPU, no vLLM...).
    ``vllm``: its commands run with the vLLM interpreter (``--vllm-python``); ``trl``: with TRL's (``--trl-python``).
    """

    name: str
    produces: str
    expected: str
    commands: Callable[[Context], list[Command]]
    collect: Callable[[Context, list], tuple[list[Path], dict]]
    render: Callable[[Context], dict[tuple[str, str], str]]
    blocks: tuple[str, ...] = ()
    needs: Callable[[Context], str | None] = lambda ctx: None
    vllm: bool = False
    trl: bool = False


# --------------------------------------------------------------------------- generated blocks


def _block_pattern(name: str) -> re.Pattern:
    name = re.escape(name)
    return re.compile(rf"(<!-- generated:{name}(?: [^>]*)? -->)(.*?)(<!-- /generated:{name} -->)", re.S)


def rewrite_block(text: str, name: str, body: str) -> str:
    """``text`` with the block ``name`` holding ``body``; ``ValueError`` unless there is exactly one such block.

    A block whose opening marker ends its line gets ``body`` on lines of its own between the markers; any
    other block is inline: ``body`` goes between the markers with its newlines as spaces.
    """
    matches = list(_block_pattern(name).finditer(text))
    if len(matches) != 1:
        raise ValueError(
            f"generated block {name!r}: expected one <!-- generated:{name} --> ... <!-- /generated:{name} -->, "
            f"found {len(matches)}"
        )
    match = matches[0]
    if match.group(2).startswith("\n"):
        inner = "\n" + body.strip("\n") + "\n"
    else:
        inner = " ".join(body.split())
    return text[: match.start(2)] + inner + text[match.end(2) :]


def rewrite_document(path: Path, blocks: dict[str, str]) -> None:
    """Rewrite every block of ``blocks`` in ``path`` at once: all of them are checked before the file changes."""
    if not path.is_file():
        raise ValueError(f"{path}: the document with block(s) {', '.join(blocks)} is not there")
    text = path.read_text(encoding="utf-8")
    for name, body in blocks.items():
        text = rewrite_block(text, name, body)
    path.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- readers


def read_csv(path: Path) -> list[dict[str, str]]:
    """A CSV's rows as dicts of strings; ``ValueError`` naming the file when it is not there."""
    if not path.is_file():
        raise ValueError(f"{path}: not there; run its stage first")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def copy(src: Path, dst: Path) -> Path:
    if not src.is_file():
        raise ValueError(f"{src}: the command did not write it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's ``metrics.jsonl`` rows (a torn last line dropped)."""
    rows = []
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def val_curve(rows: list[dict]) -> list[tuple[int, float]]:
    """``(step, test accuracy)`` at every validation (the first ``val-core/...`` metric of a row)."""
    out = []
    for r in rows:
        for key, value in r.items():
            if key.startswith("val-core/"):
                out.append((int(r["training/global_step"]), float(value)))
                break
    return out


def stage_seconds(rows: list[dict], stage: str) -> list[float]:
    """``timing_s/<stage>`` of every training row that logged it."""
    return [float(r[f"timing_s/{stage}"]) for r in rows if f"timing_s/{stage}" in r]


def run_facts(run_dir: Path) -> dict:
    """Iterations, summed step time, and the test accuracy curve of one ``sfpo train`` run."""
    rows = read_metrics(run_dir)
    curve = val_curve(rows)
    steps = stage_seconds(rows, "step")
    return {
        "iterations": len(steps),
        "step_time_s": round(sum(steps), 2),
        "acc_start": curve[0][1] if curve else "",
        "acc_end": curve[-1][1] if curve else "",
        "val_curve": " ".join(f"{s}:{a:.3f}" for s, a in curve),
    }


def section(markdown: str, heading_start: str) -> str:
    """The body of the first ``## `` section of ``markdown`` whose heading starts with ``heading_start``;
    ``ValueError`` naming the heading when there is none."""
    parts = re.split(r"^## ", markdown, flags=re.M)
    for part in parts[1:]:
        heading, _, body = part.partition("\n")
        if heading.startswith(heading_start):
            return body.strip()
    raise ValueError(f"the report has no section starting {heading_start!r}")


def bullets(markdown: str) -> str:
    """The bullet lines of ``markdown`` (a list item with its continuation lines)."""
    out, inside = [], False
    for line in markdown.splitlines():
        if line.startswith(("- ", "* ")):
            inside = True
            out.append(line)
        elif inside and line.startswith("  ") and line.strip():
            out.append(line)
        else:
            inside = False
    return "\n".join(out)


# --------------------------------------------------------------------------- formatting


def md_table(header: list[str], rows: list[list[str]], right: tuple[int, ...] = ()) -> str:
    """A Markdown table; columns whose index is in ``right`` are right-aligned."""
    rule = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def number(value, fmt: str = "{:.3f}") -> str:
    """``value`` (a string or number from a CSV) formatted, "n/a" where it is empty or not a number."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(x) else fmt.format(x)


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """Median (min-max) of ``values``; the value alone for one."""
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def duration(seconds: float) -> str:
    """``51 s``, ``3 min 5 s``, ``52.5 min``."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 600:
        return f"{int(seconds // 60)} min {seconds % 60:.0f} s"
    return f"{seconds / 60:.1f} min"


def timing_line(prov: dict) -> str:
    """What the stage's commands cost in all: wall-clock and CPU time (``wait4`` of each command)."""
    commands = prov.get("commands", [])
    wall = sum(c.get("wall_s", 0.0) for c in commands)
    cpu = sum(c.get("cpu_s", 0.0) for c in commands)
    return f"{duration(wall)} of wall-clock, {duration(cpu)} of CPU time"


def quick_note(prov: dict) -> str:
    """A warning line for numbers from a ``--quick`` check (tiny settings), else empty."""
    return (
        "**Pipeline check with tiny settings (--quick): these numbers measure nothing.**\n\n"
        if prov.get("quick")
        else ""
    )
