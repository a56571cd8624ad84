"""Markdown table of a pytest-benchmark JSON file written by ``pytest bench/ --benchmark-json=FILE``.

    python bench/summary.py FILE.json [-o OUT.md]

One row per benchmark, grouped by op, dtype and offload mode, fastest first:
name, backend, dtype, offload, median ms, GB/s, % of copy, launches. Above the
table: the device, versions, git revision and the copy bandwidths measured in
the same run. (pandas' ``to_markdown`` needs ``tabulate``; the table is written
here instead.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

COLUMNS = {  # header -> column of the flattened JSON
    "name": "name",
    "backend": "extra_info.backend",
    "dtype": "extra_info.dtype",
    "offload": "extra_info.offload",
    "median ms": "median_ms",
    "GB/s": "extra_info.gbps",
    "% of copy": "extra_info.pct_of_copy",
    "launches": "extra_info.launches",
}
NUMERIC = {"median ms", "GB/s", "% of copy"}


def load(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The benchmarks as a flat frame (one row each) and the file's header fields."""
    data = json.loads(Path(path).read_text())
    frame = pd.json_normalize(data.get("benchmarks", []))
    if frame.empty:
        return frame, data
    frame["median_ms"] = frame["stats.median"] * 1e3
    for col in COLUMNS.values():
        if col not in frame:
            frame[col] = None
    order = ["extra_info.op", "extra_info.dtype", "extra_info.offload", "median_ms"]
    frame = frame.sort_values([c for c in order if c in frame], kind="stable", na_position="last")
    return frame, data


def _cell(value, header: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if header in NUMERIC:
        value = float(value)
        if header == "median ms":
            return f"{value:.4f}" if value < 1 else f"{value:.3f}" if value < 100 else f"{value:.1f}"
        if header == "% of copy" or value >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}" if value >= 0.001 else "<0.001"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).replace("|", "\\|")


def markdown_table(frame: pd.DataFrame) -> str:
    headers = list(COLUMNS)
    right = [h in NUMERIC or h == "launches" for h in headers]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_cell(row[COLUMNS[h]], h) for h in headers) + " |")
    return "\n".join(lines)


def header(frame: pd.DataFrame, data: dict) -> str:
    sfpo = data.get("machine_info", {}).get("sfpo", {})
    if not sfpo and not frame.empty:  # older files: the same fields sit in every row's extra_info
        first = frame.iloc[0]
        sfpo = {k: first.get(f"extra_info.{k}") for k in ("device", "torch", "triton", "git_rev", "size")}
    lines = [
        "# sfpo_kernels benchmarks",
        "",
        f"- device: {sfpo.get('device', '?')}; torch {sfpo.get('torch', '?')}, triton {sfpo.get('triton', '?')}",
        f"- git revision: {sfpo.get('git_rev', '?')}; shapes: {sfpo.get('size', '?')}; run: {data.get('datetime', '?')}",
    ]
    if not frame.empty and "extra_info.copy_gbps" in frame:
        probes = frame.dropna(subset=["extra_info.copy_gbps"]).groupby(["extra_info.limit", "extra_info.param_bytes"])
        for (limit, nbytes), rows in probes:
            gbps = rows["extra_info.copy_gbps"].iloc[0]
            size = f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.3g} MB"
            lines.append(f"- {limit} of {size}: {gbps:.1f} GB/s (measured in this run)")
    lines += [
        "",
        "GB/s counts every byte each row really moves (temporaries included); % of copy divides it by",
        "the copy bandwidth above (device memory: read + write; offload: bytes over the bus).",
        "Launches: device operations per call (kernels + memcpys), from torch.profiler; n/a on the CPU.",
        "",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("-o", "--output", help="write the Markdown here instead of stdout")
    args = parser.parse_args(argv)
    frame, data = load(args.bench_json)
    text = header(frame, data) + (markdown_table(frame) if not frame.empty else "(no benchmarks in this file)") + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
