"""Writing a report: its CSV tables, and its sections as Markdown (report.md) and as a standalone HTML page.

A report is a title and a list of :class:`Section`; a section is a heading and
blocks: :class:`Paragraph`, :class:`Bullets`, :class:`Table` and :class:`Image`.
Each block has a Markdown and an HTML rendering; tables go through pandas on
both sides (``DataFrame.to_markdown`` / ``to_html``), their cells formatted
by :func:`format_cell`. Prose is plain text but for ``**bold**`` and
```code```, which the HTML renders as such.

Text from outside the code (run directory names, above all) is written as
text, never as markup: ``&``, ``<``, ``>`` and ``|`` are escaped in the
Markdown (no raw HTML, no table cell split), everything HTML-escaped in the
page. In CSV, a text cell a spreadsheet would read as a formula (starting
with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return, and not a number)
is written with a leading ``'`` (:func:`csv_safe`).
"""

from __future__ import annotations

import html
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    frame: pd.DataFrame  # written without its index: reset_index() first to show it


@dataclass(frozen=True)
class Image:
    name: str  # a file beside the report
    alt: str = ""


Block = Paragraph | Bullets | Table | Image


@dataclass
class Section:
    heading: str  # "" for the text under the title
    blocks: list[Block] = field(default_factory=list)


CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;"
    "text-align:right}th{background:#f3f3f3}img{max-width:100%}"
)


def format_cell(value) -> str:
    """A table cell: yes/no, n/a for NaN, integers as such, else 0/1/3 decimals by size, 2 digits below 0.01."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        if value.is_integer():
            return str(int(value))
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}" if abs(value) >= 0.01 else f"{value:.2g}"
    return str(value)


def format_column(values: pd.Series) -> pd.Series:
    """A table column, every number with the same decimals (so a column never mixes 2.2e-05, 0.0035 and 14.3).

    Integers stay integers; otherwise 3 decimals (1 from 1000, 0 from 100000 on, by the column's largest
    magnitude), or 2 significant digits of the largest value when all lie below 0.01. Non-numbers as
    :func:`format_cell`.
    """
    numbers = [
        float(v)
        for v in values
        if isinstance(v, (float, np.floating)) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)
    ]
    if not numbers or all(x.is_integer() for x in numbers):
        return values.map(format_cell)
    top = max(abs(x) for x in numbers)
    if top >= 100000:
        decimals = 0
    elif top >= 1000:
        decimals = 1
    elif top >= 0.01 or top == 0:
        decimals = 3
    else:
        decimals = 1 - math.floor(math.log10(top))

    def cell(v):
        if isinstance(v, (float, np.floating)) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v):
            return f"{v:.{decimals}f}"
        return format_cell(v)

    return values.map(cell)


def _cells(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.apply(format_column).rename(columns=str)


def md_text(text: str) -> str:
    """``text`` for Markdown: ``&``, ``<`` and ``>`` as entities (no raw HTML), ``|`` escaped, one line."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return text.replace("\r", " ").replace("\n", " ")


def _markdown(block: Block) -> str:
    if isinstance(block, Paragraph):
        return md_text(block.text)
    if isinstance(block, Bullets):
        return "\n".join(f"- {md_text(item)}" for item in block.items)
    if isinstance(block, Table):
        cells = _cells(block.frame).map(md_text)
        cells.columns = [md_text(c) for c in cells.columns]
        align = ["right" if pd.api.types.is_numeric_dtype(block.frame[c]) else "left" for c in block.frame]
        return cells.to_markdown(index=False, disable_numparse=True, colalign=align)
    return f"![{md_text(block.alt)}]({block.name})"


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _html(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        return _cells(block.frame).to_html(index=False, border=0)
    return f"<p><img src='{html.escape(block.name)}' alt='{html.escape(block.alt)}'></p>"


def markdown(title: str, sections: list[Section]) -> str:
    """The report as Markdown: ``# title``, then each section's ``## heading`` and blocks, blank-line separated."""
    parts = [f"# {md_text(title)}"]
    for section in sections:
        if section.heading:
            parts.append(f"## {md_text(section.heading)}")
        parts += [_markdown(block) for block in section.blocks]
    return "\n\n".join(parts) + "\n"


def html_page(title: str, sections: list[Section]) -> str:
    """The report as a standalone page: the same blocks, tables as HTML tables, the PNGs inline by name."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        if section.heading:
            parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        parts += [_html(block) for block in section.blocks]
    parts.append("</body></html>")
    return "\n".join(parts)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet read a cell as a formula


def csv_safe(value):
    """``value`` for a CSV cell: a text a spreadsheet would run as a formula gets a leading ``'``; others as they are.

    ``"=cmd|' /C calc'!A0"`` -> ``"'=cmd|' /C calc'!A0"``; ``"-0.5"`` and ``"+3"`` stay (numbers).
    """
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
        return value
    try:
        float(value)
    except ValueError:
        return "'" + value
    return value


def csv_safe_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with :func:`csv_safe` applied to every text cell, column name and index label."""
    out = frame.rename(index=csv_safe, columns=csv_safe)
    for col in out.columns:
        if not pd.api.types.is_numeric_dtype(out[col]):
            out[col] = out[col].map(csv_safe)
    return out


def write_csvs(out_dir: str, tables: dict[str, tuple[pd.DataFrame, bool]]) -> dict[str, str]:
    """``{file name: (table, whether its index is a column)}`` written as CSV into ``out_dir``; ``{name: path}``.

    Every CSV a report writes goes through here, its text cells through :func:`csv_safe`.
    """
    written = {}
    for name, (frame, index) in tables.items():
        written[name] = os.path.join(out_dir, name)
        csv_safe_frame(frame).to_csv(written[name], index=index)
    return written


def write_pages(out_dir: str, title: str, sections: list[Section]) -> dict[str, str]:
    """report.md and report.html into ``out_dir``; ``{name: path}``."""
    written = {}
    for name, text in (("report.md", markdown(title, sections)), ("report.html", html_page(title, sections))):
        written[name] = os.path.join(out_dir, name)
        with open(written[name], "w") as f:
            f.write(text)
    return written
