"""Markdown table of a pytest-benchmark JSON file written by ``pytest bench/ --benchmark-json=FILE``.

    python bench/summary.py FILE.json [-o OUT.md]

One row per benchmark, grouped by op, dtype and offload mode, fastest first:
name, backend, dtype, offload, median ms, GB/s, % of copy, launches. Above the
table: the device, versions, git revision and the copy bandwidths measured in
the same run. The GRPO loss rows (``grpo_loss``, ``logprob_entropy``) get a
table of their own below: mode, shape, effective GB/s, time over the byte
limit, peak memory, and time / memory of the eager row of the same shape over
theirs. The SFPO-step rows and the training-iteration rows (one GRPO vs one
SFPO ``Trainer.train_step``, per stage) get tables of their own too, and so do the
fused LM head rows (``linear_grpo_loss``): time and memory of the materialised
row of the same shape over theirs, and the TRL rows (``bench/trl_summary.py``:
TRL's iterations and loss against sfpo's, and their targets met or missed).
(pandas' ``to_markdown`` needs ``tabulate``; the tables are written here
instead.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from bench.trl_summary import split_trl_rows, trl_section, trl_target_lines

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

LOSS_OPS = ("grpo_loss", "logprob_entropy")
LOSS_COLUMNS = {  # the loss table: header -> column
    "op": "extra_info.op",
    "mode": "extra_info.mode",
    "kl": "extra_info.kl",
    "impl": "extra_info.impl",
    "N": "extra_info.n_tokens",
    "V": "extra_info.vocab",
    "dtype": "extra_info.dtype",
    "median ms": "median_ms",
    "GB/s": "extra_info.gbps",
    "% of copy": "extra_info.pct_of_copy",
    "x limit": "extra_info.x_of_limit",
    "peak MiB": "extra_info.peak_mem_mib",
    "eager/this time": "time_vs_eager",
    "eager/this mem": "memory_vs_eager",
    "launches": "extra_info.launches",
}
LINEAR_OP = "linear_grpo_loss"
LINEAR_BASELINE = "materialised"
LINEAR_COLUMNS = {  # the fused LM head table (test_bench_linear_loss.py): header -> column
    "mode": "extra_info.mode",
    "impl": "extra_info.impl",
    "N": "extra_info.n_tokens",
    "H": "extra_info.hidden",
    "V": "extra_info.vocab",
    "dtype": "extra_info.dtype",
    "median ms": "median_ms",
    "head TFLOP/s": "extra_info.head_tflops",
    "peak MiB": "extra_info.peak_mem_mib",
    "largest MiB": "extra_info.largest_tensor_mib",
    "mat./this time": "_time_ratio",
    "mat./this mem": "_memory_ratio",
}
STEP_COLUMNS = {  # the SFPO-step table (test_bench_sfpo_step.py): header -> column
    "algo": "extra_info.algo",
    "offload": "extra_info.offload",
    "model": "extra_info.model",
    "median ms": "median_ms",
    "snapshot ms": "_snapshot_ms",
    "fast ms": "_fast_ms",
    "reposition ms": "_reposition_ms",
    "slow ms": "_slow_ms",
    "stage II / update": "extra_info.stage2_share_of_update",
    "extra copies": "extra_info.extra_copies_of_params",
    "vs authors' 2 copies": "extra_info.extra_memory_vs_authors_two_copies",
}
STAGES = ("snapshot", "fast", "reposition", "slow")
TRAINING_OP = "training_step"
TRAINING_STAGES = {  # the training-iteration table (test_bench_training.py): header -> stage
    "gen": "gen",
    "reward": "reward",
    "old_log_prob": "old_log_prob",
    "adv": "adv",
    "snapshot": "sfpo_snapshot",
    "fast": "sfpo_fast",
    "reposition": "sfpo_reposition",
    "slow": "sfpo_slow",
    "(optimizer)": "optimizer",
    "sync": "sync_weights",
    "other": "other",
    "step": "step",
}
TRAINING_COLUMNS = {
    "variant": "extra_info.variant",
    "algo": "extra_info.algo",
    "model": "extra_info.model",
    "prompts x n": "_batch",
    **{f"{h} ms": f"_{stage}_ms" for h, stage in TRAINING_STAGES.items()},
    "peak GB": "extra_info.peak_memory_gb",
    "profiler %": "_overhead_pct",
}
RATIOS = {
    "x limit",
    "eager/this time",
    "eager/this mem",
    "mat./this time",
    "mat./this mem",
    "head TFLOP/s",
    "stage II / update",
    "extra copies",
    "vs authors' 2 copies",
}
NUMERIC |= {f"{stage} ms" for stage in STAGES} | {f"{h} ms" for h in TRAINING_STAGES} | {"profiler %"}
RATIOS |= {"peak GB"}
LOSS_NUMERIC = NUMERIC | RATIOS | {"peak MiB", "largest MiB"}
EAGER_IMPL = "verl_eager"
SAME_SHAPE = [
    "extra_info.op",
    "extra_info.mode",
    "extra_info.kl",
    "extra_info.n_tokens",
    "extra_info.vocab",
    "extra_info.dtype",
]


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
    if isinstance(value, str):  # "n/a" where the CPU has no such number
        return value.replace("|", "\\|")
    if header in RATIOS:
        value = float(value)
        return "<0.01" if value < 0.01 else f"{value:.2f}" if value < 100 else f"{value:.0f}"
    if header in ("peak MiB", "largest MiB"):
        return f"{float(value):.1f}"
    if header in NUMERIC:
        value = float(value)
        if value == 0:
            return "0"
        if header == "median ms":
            return f"{value:.4f}" if value < 1 else f"{value:.3f}" if value < 100 else f"{value:.1f}"
        if header == "% of copy" or value >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}" if value >= 0.001 else "<0.001"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).replace("|", "\\|")


def markdown_table(frame: pd.DataFrame, columns: dict[str, str] = COLUMNS) -> str:
    headers = list(columns)
    right = [h in LOSS_NUMERIC or h in ("launches", "N", "V") for h in headers]  # numbers align right
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_cell(row[columns[h]], h) for h in headers) + " |")
    return "\n".join(lines)


def split_loss_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(other rows, loss rows)``; the loss rows with their ratios to the eager row of the same shape."""
    if frame.empty or "extra_info.op" not in frame:
        return frame, frame.iloc[0:0]
    is_loss = frame["extra_info.op"].isin(LOSS_OPS)
    other, loss = frame[~is_loss], frame[is_loss].copy()
    if loss.empty:
        return other, loss
    for col in [*LOSS_COLUMNS.values(), *SAME_SHAPE, "extra_info.impl", "extra_info.peak_mem_bytes"]:
        if col not in loss:
            loss[col] = None
    loss["_peak"] = pd.to_numeric(loss["extra_info.peak_mem_bytes"], errors="coerce")
    eager = loss.loc[loss["extra_info.impl"] == EAGER_IMPL, SAME_SHAPE + ["median_ms", "_peak"]]
    eager = eager.rename(columns={"median_ms": "_eager_ms", "_peak": "_eager_peak"}).drop_duplicates(SAME_SHAPE)
    loss = loss.merge(eager, on=SAME_SHAPE, how="left")
    loss["time_vs_eager"] = loss["_eager_ms"] / loss["median_ms"]
    loss["memory_vs_eager"] = loss["_eager_peak"] / loss["_peak"].where(loss["_peak"] > 0)
    loss["_op_order"] = loss["extra_info.op"].map({op: i for i, op in enumerate(LOSS_OPS)})
    loss["_mode_order"] = loss["extra_info.mode"].map({"full": 0, "fwd": 1})
    loss["_kl_order"] = (loss["extra_info.kl"] != "off").astype(int)
    order = ["_op_order", "_mode_order", "_kl_order", "extra_info.n_tokens", "median_ms"]
    return other, loss.sort_values(order, kind="stable", na_position="last")


def split_linear_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(other rows, fused LM head rows)``; the latter with the materialised row's time and memory over theirs.

    Memory: the GPU's peak allocation above the inputs where measured, else (CPU) the largest tensor.
    """
    if frame.empty or "extra_info.op" not in frame:
        return frame, frame.iloc[0:0]
    is_linear = frame["extra_info.op"] == LINEAR_OP
    other, rows = frame[~is_linear], frame[is_linear].copy()
    if rows.empty:
        return other, rows
    for col in [*LINEAR_COLUMNS.values(), "extra_info.peak_mem_bytes", "extra_info.largest_tensor_bytes"]:
        if col not in rows and not col.startswith("_"):
            rows[col] = None
    peak = pd.to_numeric(rows["extra_info.peak_mem_bytes"], errors="coerce")
    rows["_mem"] = peak.fillna(pd.to_numeric(rows["extra_info.largest_tensor_bytes"], errors="coerce"))
    shape = ["extra_info.mode", "extra_info.n_tokens", "extra_info.vocab", "extra_info.dtype"]
    base = rows.loc[rows["extra_info.impl"] == LINEAR_BASELINE, shape + ["median_ms", "_mem"]]
    base = base.rename(columns={"median_ms": "_base_ms", "_mem": "_base_mem"}).drop_duplicates(shape)
    rows = rows.merge(base, on=shape, how="left")
    rows["_time_ratio"] = rows["_base_ms"] / rows["median_ms"]
    rows["_memory_ratio"] = rows["_base_mem"] / rows["_mem"].where(rows["_mem"] > 0)
    rows["_mode_order"] = rows["extra_info.mode"].map({"full": 0, "fwd": 1})
    return other, rows.sort_values(["_mode_order", "extra_info.n_tokens", "median_ms"], kind="stable")


def linear_section(rows: pd.DataFrame) -> str:
    return "\n".join(
        [
            "## GRPO loss with the LM head fused in (no [N, V] logits)",
            "",
            "mat./this: the materialised row's (lm_head, then grpo_loss) time and memory over this row's, same",
            "mode and shape (targets at N=16384, V=151936 bf16 on a GPU, full: time >= 0.95, memory >= 10). Memory:",
            "peak MiB above the inputs on a GPU; on the CPU (peak n/a) the largest single tensor one call makes.",
            "",
            markdown_table(rows, LINEAR_COLUMNS),
        ]
    )


def split_step_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(other rows, SFPO-step rows)``; the step rows with their stage times in ms."""
    if frame.empty or "extra_info.algo" not in frame:
        return frame, frame.iloc[0:0]
    is_step = frame["extra_info.algo"].notna()
    other, step = frame[~is_step], frame[is_step].copy()
    for stage in STAGES:
        step[f"_{stage}_ms"] = pd.to_numeric(step.get(f"extra_info.timing_s/sfpo_{stage}"), errors="coerce") * 1e3
    for col in STEP_COLUMNS.values():
        if col not in step:
            step[col] = None
    return other, step


def split_training_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(other rows, training-iteration rows)``; the latter with stage times in ms, GRPO first."""
    if frame.empty or "extra_info.op" not in frame:
        return frame, frame.iloc[0:0]
    is_training = frame["extra_info.op"] == TRAINING_OP
    other, train = frame[~is_training], frame[is_training].copy()
    if train.empty:  # a run of other files only: their columns are not there
        return other, train
    for stage in TRAINING_STAGES.values():
        train[f"_{stage}_ms"] = pd.to_numeric(train.get(f"extra_info.timing_s/{stage}"), errors="coerce") * 1e3
    train["_batch"] = [
        f"{int(p)} x {int(n)}" for p, n in zip(train["extra_info.prompts"], train["extra_info.responses_per_prompt"])
    ]
    train["_overhead_pct"] = pd.to_numeric(train.get("extra_info.profiler_overhead_frac"), errors="coerce") * 100
    for col in TRAINING_COLUMNS.values():
        if col not in train:
            train[col] = None
    if "extra_info.variant" not in train:  # results written before the on-policy variants existed
        train["extra_info.variant"] = "default"
    return other, train.sort_values(["extra_info.variant", "extra_info.algo"], kind="stable")


def training_section(train: pd.DataFrame) -> str:
    lines = [
        "## One training iteration, GRPO vs SFPO (K=3), per stage",
        "",
        "Each round is one `Trainer.train_step()`; stage times are the trainer's profiler readings (the GPU",
        "synchronised at every stage boundary), means over the measured rounds. snapshot..slow make up the update;",
        "(optimizer) is the gradient clipping + AdamW steps inside the fast and slow passes, not extra time; other is",
        "the step's unattributed rest. peak GB: torch's peak allocated on a GPU, process RSS on the CPU. profiler %:",
        "the profiler's own bookkeeping over the step.",
        "",
        markdown_table(train, TRAINING_COLUMNS),
    ]
    for variant, rows in train.groupby("extra_info.variant", sort=False):  # one GRPO and one SFPO row each
        by_algo = rows.set_index("extra_info.algo")
        if not ({"grpo", "sfpo"} <= set(by_algo.index) and by_algo.index.is_unique):
            continue
        g, s = by_algo.loc["grpo"], by_algo.loc["sfpo"]
        ratio = s["_step_ms"] / g["_step_ms"]
        gen_share = 100 * g["_gen_ms"] / g["_step_ms"]
        extra = float(s["extra_info.peak_memory_gb"]) - float(g["extra_info.peak_memory_gb"])
        lines += [
            "",
            f"{variant}: SFPO/GRPO step time {ratio:.2f}x (generation is {gen_share:.0f}% of the GRPO "
            f"step); SFPO's peak memory {extra:+.3f} GB against GRPO's.",
        ]
    return "\n".join(lines)


def step_section(step: pd.DataFrame) -> str:
    return "\n".join(
        [
            "## One SFPO iteration (K=3) vs one GRPO iteration",
            "",
            "Stage times are the means of the measured iterations (the GPU synchronised at each stage).",
            "stage II / update: (snapshot + reposition) over (fast + slow passes);",
            "target (docs/conventions.md) < 0.01.",
            "extra copies: SFPO's device-resident snapshot in copies of the trainable parameters (target <= 1,",
            "0 with offload); vs authors' 2 copies: the same over the two copies the authors' release keeps.",
            "",
            markdown_table(step, STEP_COLUMNS),
        ]
    )


def loss_section(loss: pd.DataFrame) -> str:
    return "\n".join(
        [
            "## GRPO loss: the vocabulary pass",
            "",
            "GB/s here is effective: the byte limit over the median time (fwd: the logits read once; full:",
            "read twice + dlogits written once), whatever the row really moves. x limit: the median over the",
            "limit's time at the copy bandwidth above (target (docs/conventions.md) for sfpo_triton full:",
            "<= 1.3). peak MiB: allocated by one call above its inputs (n/a on the CPU). eager/this:",
            "verl_eager's time (memory) over this row's, same op, mode, kl and shape (targets for sfpo_triton",
            "full: >= 3 and >= 4).",
            "On the CPU none of these numbers speak to the targets.",
            "",
            markdown_table(loss, LOSS_COLUMNS),
        ]
    )


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
    if is_cpu(sfpo.get("device", "")):
        lines += ["", CPU_NOTE]
    lines += [
        "",
        "GB/s counts every byte each row really moves (temporaries included); % of copy divides it by",
        "the copy bandwidth above (device memory: read + write; offload: bytes over the bus).",
        "Launches: device operations per call (kernels + memcpys), from torch.profiler; n/a on the CPU.",
        "",
        "",
    ]
    return "\n".join(lines)


# what identifies "the same work" for the ratio lines: rows that agree on these (where present) are compared
RATIO_KEYS = [
    "extra_info.op",
    "extra_info.mode",
    "extra_info.n_tokens",
    "extra_info.vocab",
    "extra_info.dtype",
    "extra_info.offload",
    "extra_info.kl",
    "extra_info.model",
    "extra_info.variant",
]
SKIPPED_KEY = "sfpo_skipped"  # the JSON's list of skipped rows ({"name", "reason"}), written by bench/conftest.py
SHAPE_LABELS = {"extra_info.n_tokens": "N", "extra_info.vocab": "V"}  # integers, shown as N=64 V=512
SETTING_LABELS = {"extra_info.offload": "offload", "extra_info.kl": "kl"}  # shown as offload=cpu, where not off
NOT_SET = ("None", "nan", "none", "False", "off", "")
CPU_NOTE = (
    "On the CPU these ratios say nothing about the GPU targets (docs/conventions.md, 'Performance targets'): "
    "the shapes are toys, nothing is memory-bound, and Triton runs only in its interpreter."
)
RATIO_HEADING = "## sfpo against its baselines (median times; >1x: sfpo faster)"
SPREAD_NOTE = (
    "Spread: sfpo's interquartile range of times (IQR); after each ratio of medians, its range over both rows' "
    "quartiles (baseline q1 / sfpo q3 to baseline q3 / sfpo q1)."
)


def _label(row: pd.Series) -> str:
    impl, backend = row.get("extra_info.impl"), row.get("extra_info.backend")
    return str(impl if isinstance(impl, str) and impl else backend)


def describe_work(keys: list[str], values) -> str:
    """The work a group of rows did, e.g. ``grpo_loss full N=64 V=512 float32`` (shape numbers named, as integers)."""
    parts = []
    for key, value in zip(keys, values):
        text = str(value)
        if text in NOT_SET:
            continue
        if key in SHAPE_LABELS:
            number = float(text)
            parts.append(f"{SHAPE_LABELS[key]}={int(number) if number.is_integer() else number}")
        elif key in SETTING_LABELS:
            parts.append(f"{SETTING_LABELS[key]}={text}")
        else:
            parts.append(text)
    return " ".join(parts)


def _quartiles_ms(row: pd.Series) -> tuple[float, float] | None:
    """``(q1, q3)`` of the row's times in ms, where the benchmark recorded them."""
    q1, q3 = row.get("stats.q1"), row.get("stats.q3")
    if q1 is None or q3 is None or pd.isna(q1) or pd.isna(q3):
        return None
    return 1e3 * float(q1), 1e3 * float(q3)


def _ours(o: pd.Series) -> str:
    spread = _quartiles_ms(o)
    iqr = f" (IQR {spread[0]:.3g}-{spread[1]:.3g})" if spread else ""
    return f"{_label(o)} {o['median_ms']:.3g} ms{iqr}"


def _ratio(b: pd.Series, o: pd.Series) -> str:
    text = f"{_label(b)} {b['median_ms'] / o['median_ms']:.2f}x"
    ours, theirs = _quartiles_ms(o), _quartiles_ms(b)
    if ours and theirs and ours[0] > 0:
        text += f" ({theirs[0] / ours[1]:.2f}-{theirs[1] / ours[0]:.2f})"
    return text


def ratio_lines(frame: pd.DataFrame) -> list[str]:
    """The short summary: per piece of work, sfpo's median time against each baseline's, as ratios.

    Ours are the rows whose ``backend`` is an sfpo backend (triton, cuda, torch: the public
    functions), baselines those with ``backend == "baseline"``; ``baseline / sfpo`` > 1 means
    sfpo is faster. Each names the work (op, mode, shape as ``N=``/``V=``, dtype, settings) and
    shows the spread (:data:`SPREAD_NOTE`). SFPO-step and training rows (``algo``) give SFPO's
    step over GRPO's.
    """
    if frame.empty:
        return []
    lines = []
    keys = [k for k in RATIO_KEYS if k in frame]
    has_algo = "extra_info.algo" in frame
    algo = frame["extra_info.algo"] if has_algo else pd.Series(None, index=frame.index)
    kernels = frame[algo.isna() & frame.get("extra_info.backend", pd.Series(None, index=frame.index)).notna()]
    for key, group in kernels.groupby([kernels[k].astype(str) for k in keys], sort=False, dropna=False):
        ours = group[group["extra_info.backend"] != "baseline"]
        base = group[group["extra_info.backend"] == "baseline"]
        what = describe_work(keys, key)
        for _, o in ours.iterrows():
            ratios = [_ratio(b, o) for _, b in base.iterrows() if o["median_ms"] > 0]
            if ratios:
                lines.append(f"{what}: {_ours(o)}; baseline/sfpo: {', '.join(ratios)}")
    if has_algo:
        steps = frame[algo.notna()]
        for key, group in steps.groupby([steps[k].astype(str) for k in keys], sort=False, dropna=False):
            by = {a: g["median_ms"].median() for a, g in group.groupby("extra_info.algo")}
            if "grpo" in by and "sfpo" in by and by["grpo"] > 0:
                lines.append(
                    f"{describe_work(keys, key)}: SFPO {by['sfpo']:.3g} ms vs GRPO {by['grpo']:.3g} ms per step: "
                    f"SFPO/GRPO {by['sfpo'] / by['grpo']:.2f}x"
                )
    return lines


def skip_lines(skipped: list[dict]) -> list[str]:
    """Why rows did not run: one line per reason (``skipped``: ``{"name", "reason"}`` each), most rows first."""
    by_reason: dict[str, list[str]] = {}
    for row in skipped:
        by_reason.setdefault(row["reason"], []).append(row["name"])
    ordered = sorted(by_reason.items(), key=lambda item: -len(item[1]))
    return [f"{len(names)} skipped: {reason} (e.g. {names[0]})" for reason, names in ordered]


def is_cpu(device: str) -> bool:
    return str(device).lower().startswith("cpu")


def summary_lines(frame: pd.DataFrame, device: str, skipped: list[dict]) -> list[str]:
    """What ``pytest bench/ --benchmark-only`` prints last: the ratio lines, how to read them, and the skips."""
    lines = [CPU_NOTE] if is_cpu(device) else []
    ratios = ratio_lines(frame)
    lines += [SPREAD_NOTE, *ratios] if ratios else ["no sfpo/baseline pair ran (see the tables above)"]
    return lines + trl_target_lines(frame) + skip_lines(skipped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("-o", "--output", help="write the Markdown here instead of stdout")
    args = parser.parse_args(argv)
    frame, data = load(args.bench_json)
    other, trl = split_trl_rows(frame)
    other, loss = split_loss_rows(other)
    other, linear = split_linear_rows(other)
    other, training = split_training_rows(other)
    other, step = split_step_rows(other)
    ratios = ratio_lines(frame)
    parts = (
        [RATIO_HEADING + "\n\n" + SPREAD_NOTE + "\n\n" + "\n".join(f"- {line}" for line in ratios)] if ratios else []
    )
    if not other.empty:
        parts.append(markdown_table(other))
    if not loss.empty:
        parts.append(loss_section(loss))
    if not linear.empty:
        parts.append(linear_section(linear))
    if not step.empty:
        parts.append(step_section(step))
    if not training.empty:
        parts.append(training_section(training))
    if not trl.empty:
        parts.append(trl_section(trl))
    skipped = data.get(SKIPPED_KEY) or []
    if skipped:
        parts.append("## Rows that did not run\n\n" + "\n".join(f"- {line}" for line in skip_lines(skipped)))
    text = header(frame, data) + ("\n\n".join(parts) if parts else "(no benchmarks in this file)") + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
