"""The rows of ``bench/test_bench_trl.py`` in ``bench/summary.py``'s outputs: a table and the targets, met or missed.

Targets (CPU, the medians of interleaved CPU times):

- SFPO's own work in a TRL iteration (``trl_sfpo``'s ``sfpo_own_share_median``) under 2% of it;
- TRL with sfpo's fused head no slower than with TRL's own loss (the GRPO and SFPO iterations and the
  loss + backward: fused / TRL <= 1), and >= 8x less peak memory (TRL / fused, the CPU allocator's
  peak) at N = 4096 tokens, V = 32768;
- ``sfpo train``'s GRPO iteration at most 0.8x TRL's on the same batch.

Each line gives the measured value with its spread (ratios: the range from the rows' min and max)
and by how much the target is met or missed; a line whose rows did not run says so.
"""

from __future__ import annotations

import math

import pandas as pd

STEP_OP, LOSS_OP = "trl_step", "trl_loss"
OWN_SHARE_LIMIT = 0.02
FUSED_TIME_LIMIT = 1.0
FUSED_MEMORY_TARGET = 8.0
MEMORY_TARGET_SHAPE = (4096, 32768)  # (N tokens, V)
STANDALONE_LIMIT = 0.8
ORDER = (
    "trl_grpo",
    "trl_grpo_no_ckpt",
    "trl_grpo_fused",
    "trl_mu4",
    "trl_sfpo",
    "trl_sfpo_fused",
    "sfpo_train_grpo",
    "sfpo_train_sfpo",
    "trl",
)


def split_trl_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(other rows, TRL rows)``."""
    if frame.empty or "extra_info.op" not in frame:
        return frame, frame.iloc[0:0]
    is_trl = frame["extra_info.op"].isin([STEP_OP, LOSS_OP])
    return frame[~is_trl], frame[is_trl]


def _rows(frame: pd.DataFrame, op: str, key: str) -> dict[str, pd.Series]:
    """The rows of ``op`` by ``extra_info.<key>`` (arm or impl)."""
    if frame.empty or "extra_info.op" not in frame or f"extra_info.{key}" not in frame:
        return {}
    rows = frame[frame["extra_info.op"] == op]
    found = {str(r[f"extra_info.{key}"]): r for _, r in rows.iterrows()}
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda item: rank.get(item[0], len(ORDER))))


def _ms(row: pd.Series, stat: str) -> float:
    """The row's ``stat`` ("median", "min", "max") in ms (pytest-benchmark's stats are in seconds)."""
    if stat == "median" and "median_ms" in row and not pd.isna(row["median_ms"]):
        return float(row["median_ms"])
    return 1e3 * float(row[f"stats.{stat}"])


def _ratio(a: pd.Series, b: pd.Series) -> tuple[float, float, float]:
    """``a / b`` of the medians, and its range from the extremes (a's min over b's max .. a's max over b's min)."""
    try:
        return _ms(a, "median") / _ms(b, "median"), _ms(a, "min") / _ms(b, "max"), _ms(a, "max") / _ms(b, "min")
    except (KeyError, TypeError, ValueError):
        ratio = _ms(a, "median") / _ms(b, "median")
        return ratio, math.nan, math.nan


def _range(low: float, high: float, fmt: str = "{:.2f}") -> str:
    return "" if math.isnan(low) else f" (range {fmt.format(low)}-{fmt.format(high)})"


def verdict(value: float, limit: float, *, at_most: bool, unit: str = "x") -> str:
    """ "met by <margin>" or "MISSED by <shortfall>" for ``value`` against ``limit`` (``at_most``: value <= limit)."""
    ok = value <= limit if at_most else value >= limit
    gap = abs(limit - value)
    text = f"{gap:.2f} percentage points" if unit == "%" else f"{gap:.2f}{unit}"
    return f"met by {text}" if ok else f"MISSED by {text}"


def _shape(row: pd.Series) -> tuple[int, int]:
    return int(row["extra_info.n_tokens"]), int(row["extra_info.vocab"])


def trl_target_lines(frame: pd.DataFrame) -> list[str]:
    """One line per target from the TRL rows of a run (none when the run has no TRL rows)."""
    steps, losses = _rows(frame, STEP_OP, "arm"), _rows(frame, LOSS_OP, "impl")
    if not steps and not losses:
        return []
    lines = ["SFPO in TRL (CPU targets; medians of interleaved CPU times):"]
    lines.append(_own_share_line(steps))
    lines += _fused_lines(steps, losses)
    lines.append(_standalone_line(steps))
    return lines


def _own_share_line(steps: dict[str, pd.Series]) -> str:
    what = "SFPO's own work in a TRL iteration"
    sfpo = steps.get("trl_sfpo")
    if (
        sfpo is None
        or "extra_info.sfpo_own_share_median" not in sfpo
        or pd.isna(sfpo["extra_info.sfpo_own_share_median"])
    ):
        return f"- {what}: not measured (trl_sfpo did not run)"
    share = float(sfpo["extra_info.sfpo_own_share_median"])
    low, high = float(sfpo["extra_info.sfpo_own_share_min"]), float(sfpo["extra_info.sfpo_own_share_max"])
    own = float(sfpo["extra_info.sfpo_own_ms_median"])
    snap = 1e3 * float(sfpo["extra_info.timing_s/sfpo_snapshot_median"])
    repo = 1e3 * float(sfpo["extra_info.timing_s/sfpo_reposition_median"])
    line = (
        f"- {what}: {100 * share:.2f}% of it (range {100 * low:.2f}-{100 * high:.2f}%): {own:.2f} ms of "
        f"{_ms(sfpo, 'median'):.1f} ms (logged: snapshot {snap:.2f} ms, reposition {repo:.2f} ms wall-clock); "
        f"target < {100 * OWN_SHARE_LIMIT:.0f}%: {verdict(100 * share, 100 * OWN_SHARE_LIMIT, at_most=True, unit='%')}"
    )
    mu = steps.get("trl_mu4")
    if mu is not None:
        extra = _ms(sfpo, "median") - _ms(mu, "median")
        line += (
            f". Cross-check: trl_sfpo - trl_mu4 (the same passes without SFPO) = {extra:+.2f} ms "
            f"({100 * extra / _ms(sfpo, 'median'):+.1f}% of the iteration)"
        )
    return line


def _fused_lines(steps: dict[str, pd.Series], losses: dict[str, pd.Series]) -> list[str]:
    lines = []
    parts = []
    for method in ("grpo", "sfpo"):
        plain, fused = steps.get(f"trl_{method}"), steps.get(f"trl_{method}_fused")
        if plain is not None and fused is not None:
            r, lo, hi = _ratio(fused, plain)
            parts.append((f"{method.upper()} iteration", r, lo, hi))
    trl, fused = losses.get("trl"), losses.get("sfpo_fused")
    if trl is not None and fused is not None:
        n, v = _shape(trl)
        r, lo, hi = _ratio(fused, trl)
        parts.append((f"loss + backward at N={n} V={v}", r, lo, hi))
    what = "TRL with sfpo's fused head, time over TRL's own loss"
    if not parts:
        lines.append(f"- {what}: not measured (the fused rows did not run)")
    for name, r, lo, hi in parts:
        verdict_text = verdict(r, FUSED_TIME_LIMIT, at_most=True)
        lines.append(f"- {what}, {name}: {r:.2f}x{_range(lo, hi)}; target <= {FUSED_TIME_LIMIT:.2f}x: {verdict_text}")
    what = "Peak memory of TRL's loss over the fused head's (CPU allocator)"
    if trl is None or fused is None or "extra_info.peak_alloc_bytes" not in trl:
        lines.append(f"- {what}: not measured (the loss rows did not both run)")
        return lines
    t_peak, f_peak = float(trl["extra_info.peak_alloc_bytes"]), float(fused["extra_info.peak_alloc_bytes"])
    if not (t_peak > 0 and f_peak > 0):
        lines.append(f"- {what}: not measured (no allocator peak: {trl.get('extra_info.peak_alloc_error', '?')})")
        return lines
    n, v = _shape(trl)
    ratio = t_peak / f_peak
    text = f"- {what} at N={n} V={v}: {t_peak / 2**20:.1f} MiB / {f_peak / 2**20:.1f} MiB = {ratio:.2f}x; "
    if (n, v) == MEMORY_TARGET_SHAPE:
        text += f"target >= {FUSED_MEMORY_TARGET:.0f}x: {verdict(ratio, FUSED_MEMORY_TARGET, at_most=False)}"
    else:
        text += (
            f"the target (>= {FUSED_MEMORY_TARGET:.0f}x) is at N={MEMORY_TARGET_SHAPE[0]} V={MEMORY_TARGET_SHAPE[1]} "
            "(SFPO_BENCH_TRL=full)"
        )
    lines.append(text)
    return lines


def _standalone_line(steps: dict[str, pd.Series]) -> str:
    what = "sfpo train's GRPO iteration over TRL's on the same batch"
    ours, trl = steps.get("sfpo_train_grpo"), steps.get("trl_grpo")
    if ours is None or trl is None:
        return f"- {what}: not measured (sfpo_train_grpo and trl_grpo did not both run)"
    r, lo, hi = _ratio(ours, trl)
    line = (
        f"- {what}: {r:.2f}x{_range(lo, hi)} ({_ms(ours, 'median'):.1f} ms vs {_ms(trl, 'median'):.1f} ms); "
        f"target <= {STANDALONE_LIMIT:.2f}x: {verdict(r, STANDALONE_LIMIT, at_most=True)}"
    )
    bare = steps.get("trl_grpo_no_ckpt")
    if bare is not None:
        r, lo, hi = _ratio(ours, bare)
        line += (
            f". Like for like, against TRL without activation checkpointing (GRPOConfig turns it on; sfpo train has "
            f"none): {r:.2f}x{_range(lo, hi)} ({_ms(bare, 'median'):.1f} ms), {verdict(r, STANDALONE_LIMIT, at_most=True)}"
        )
    return line


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.{digits}f}"


def _yes_no(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return "on" if bool(value) else "off"


def _conditions(row: pd.Series) -> str:
    versions = [
        f"{name} {row[f'extra_info.versions.{name}']}"
        for name in ("trl", "transformers", "torch")
        if isinstance(row.get(f"extra_info.versions.{name}"), str)
    ]
    return (
        f"torch threads {row.get('extra_info.torch_threads', '?')}; load average (1 min) "
        f"{row.get('extra_info.load_avg_1m', '?')} at the start, {row.get('extra_info.load_avg_1m_end', '?')} at the "
        f"end; {row.get('extra_info.date', '?')}" + (f"; {', '.join(versions)}." if versions else ".")
    )


def trl_section(rows: pd.DataFrame) -> str:
    """The Markdown section: one table of the iterations, one of the loss, the target lines."""
    steps, losses = _rows(rows, STEP_OP, "arm"), _rows(rows, LOSS_OP, "impl")
    out = [
        "## SFPO in TRL: one training iteration and the loss",
        "",
        "CPU time of the process (time.process_time), rounds interleaved in one process with the order rotated; "
        "median (min-max) over the measured rounds.",
    ]
    if steps:
        base = steps.get("trl_grpo")
        out += [
            "",
            "| arm | trainer | method | head | act. ckpt | prompts x n | CPU ms | rounds | / trl_grpo | SFPO own ms "
            "| own share |",
            "|---|---|---|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for arm, r in steps.items():
            rel = f"{_ms(r, 'median') / _ms(base, 'median'):.2f}" if base is not None else "-"
            share = r.get("extra_info.sfpo_own_share_median")
            share_text = "-" if share is None or pd.isna(share) else f"{100 * float(share):.2f}%"
            out.append(
                f"| {arm} | {r['extra_info.trainer']} | {r['extra_info.method']} | {r['extra_info.head']} | "
                f"{_yes_no(r.get('extra_info.activation_checkpointing'))} | "
                f"{int(r['extra_info.prompts'])} x {int(r['extra_info.responses_per_prompt'])} | "
                f"{_ms(r, 'median'):.1f} ({_ms(r, 'min'):.1f}-{_ms(r, 'max'):.1f}) | {int(r['extra_info.rounds'])} | "
                f"{rel} | {_fmt(r.get('extra_info.sfpo_own_ms_median'), 2)} | {share_text} |"
            )
        out += ["", _conditions(next(iter(steps.values())))]
    if losses:
        base = losses.get("trl")
        out += [
            "",
            "| loss impl | N | V | CPU ms | rounds | peak alloc MiB | largest tensor MiB | this / trl time | trl / this memory |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for impl, r in losses.items():
            time_rel = f"{_ms(r, 'median') / _ms(base, 'median'):.2f}" if base is not None else "-"
            peak = r.get("extra_info.peak_alloc_bytes")
            mem_rel = "-"
            if base is not None and peak is not None and not pd.isna(peak) and float(peak) > 0:
                mem_rel = f"{float(base['extra_info.peak_alloc_bytes']) / float(peak):.2f}"
            n, v = _shape(r)
            out.append(
                f"| {impl} | {n} | {v} | {_ms(r, 'median'):.1f} ({_ms(r, 'min'):.1f}-{_ms(r, 'max'):.1f}) | "
                f"{int(r['extra_info.rounds'])} | {_fmt(r.get('extra_info.peak_alloc_mib'))} | "
                f"{_fmt(r.get('extra_info.largest_tensor_mib'))} | {time_rel} | {mem_rel} |"
            )
        out += ["", _conditions(next(iter(losses.values())))]
    out += ["", *trl_target_lines(rows)]
    return "\n".join(out)
