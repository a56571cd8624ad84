"""The measurement stages of ``scripts/regenerate_results.py``: the bench/measure scripts, the CPU benchmark run,
vLLM, verl's CPU job and the GPU benchmarks (see :class:`results_lib.Stage`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from results_lib import (
    Command,
    Context,
    copy,
    duration,
    md_table,
    number,
    quick_note,
    read_csv,
    read_metrics,
    run_facts,
    spread,
    stage_seconds,
    write_csv,
)

from bench.provenance import one_line


def _script(name: str) -> str:
    return str(Path("bench") / "measure" / name)


def _has_module(python: str, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def needs_vllm(ctx: Context) -> str | None:
    if _has_module(ctx.vllm_python, "vllm"):
        return None
    return "vLLM is not installed for --vllm-python (it needs a venv of its own: docs/vllm.md)"


def needs_verl(ctx: Context) -> str | None:
    if shutil.which("bash") is None:
        return "needs bash"
    return None if _has_module(ctx.python, "verl") else "verl is not installed (pip install -e '.[verl]')"


def needs_gpu(ctx: Context) -> str | None:
    probe = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        ok = subprocess.run([ctx.python, "-c", probe], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return None if ok else "needs a CUDA GPU (torch sees none here)"


def _table_of(ctx: Context, stage: str, csv_name: str, rows_of, header, right=()) -> tuple[dict, str]:
    prov = ctx.provenance(stage)
    rows = read_csv(ctx.results(csv_name))
    return prov, quick_note(prov) + md_table(header, [rows_of(r) for r in rows], right)


# --------------------------------------------------------------------------- update_pass: the old-log-prob reuse


def update_pass_commands(ctx: Context) -> list[Command]:
    size = ["--rounds", "1", "--warmup", "0"] if ctx.quick else ["--rounds", "12"]
    csv = str(ctx.work / "old-log-prob-reuse.csv")
    return [
        Command([ctx.python, _script("measure_old_log_prob_reuse.py"), *size, "--csv", csv], {"OMP_NUM_THREADS": "1"})
    ]


def update_pass_collect(ctx: Context, timed: list) -> tuple[list[Path], dict]:
    return [copy(ctx.work / "old-log-prob-reuse.csv", ctx.results("old-log-prob-reuse.csv"))], {}


def update_pass_render(ctx: Context) -> dict[tuple[str, str], str]:
    prov = ctx.provenance("update_pass")
    rows = {(r["algorithm"], r["old_log_prob_from_update"]): r for r in read_csv(ctx.results("old-log-prob-reuse.csv"))}

    def arm(r: dict) -> str:
        return f"median {number(r['median_ms'], '{:.1f}')} ms (min {number(r['min_ms'], '{:.1f}')}, max {number(r['max_ms'], '{:.1f}')}, n={r['n']})"

    table_rows, shorter = [], []
    for algo, label in (("grpo", "GRPO"), ("sfpo", "SFPO (K=3)")):
        separate, reused = rows.get((algo, "false")), rows.get((algo, "auto"))
        if separate and reused:
            table_rows.append([label, arm(separate), arm(reused), number(reused["ratio_to_separate_pass"], "{:.2f}x")])
            shorter.append(f"{label.split()[0]} {100 * (1 - float(reused['ratio_to_separate_pass'])):.0f}%")
    table = md_table(["algorithm", "separate pass", "from the update pass", "ratio"], table_rows)
    text = (
        f"{quick_note(prov)}{table}\n\nIteration shorter with the reuse (median process time): {', '.join(shorter)}. "
        f"{one_line(prov)}"
    )
    return {("docs/update_pass.md", "old-log-prob-reuse"): text}


# --------------------------------------------------------------------------- reposition_host: Stage II's Python


REPOSITION_BASELINE = "42a2087^"  # the parent of the commit that added the Snapshot's validation cache
REPOSITION_LABELS = {
    "baseline": "previous `reposition_` (validates every call)",
    "cached": "cached `reposition_`",
    "validate": "this tree, cache emptied before each call",
    "foreach_lerp": "`torch._foreach_lerp_` alone (the floor)",
}


def reposition_host_commands(ctx: Context) -> list[Command]:
    size = ["--rounds", "2", "--calls", "2"] if ctx.quick else ["--rounds", "30"]
    argv = [ctx.python, _script("measure_reposition_host.py"), "--baseline-rev", REPOSITION_BASELINE, *size]
    return [Command([*argv, "--csv", str(ctx.work / "reposition-host.csv")], {"OMP_NUM_THREADS": "1"})]


def reposition_host_collect(ctx: Context, timed: list) -> tuple[list[Path], dict]:
    return [copy(ctx.work / "reposition-host.csv", ctx.results("reposition-host.csv"))], {}


def reposition_host_render(ctx: Context) -> dict[tuple[str, str], str]:
    def row(r: dict) -> list[str]:
        us = f"median {number(r['median_us'], '{:.1f}')} us (min {number(r['min_us'], '{:.1f}')}, max {number(r['max_us'], '{:.1f}')})"
        return [REPOSITION_LABELS.get(r["arm"], r["arm"]), us]

    prov, table = _table_of(ctx, "reposition_host", "reposition-host.csv", row, ["arm", "per call"])
    medians = {r["arm"]: float(r["median_us"]) for r in read_csv(ctx.results("reposition-host.csv"))}
    above = ""
    if {"baseline", "cached", "validate", "foreach_lerp"} <= medians.keys():
        floor, tensors = medians["foreach_lerp"], int(read_csv(ctx.results("reposition-host.csv"))[0]["tensors"])
        key = medians["validate"] - medians["baseline"]
        above = (
            f"\n\nHost time above the floor: {medians['baseline'] - floor:.0f} us before the cache, "
            f"{medians['cached'] - floor:.0f} us with it (baseline: `sfpo_kernels/reposition.py` at git "
            f"{REPOSITION_BASELINE}); a miss costs {key:.0f} us more than the previous validation, building the key "
            f"({key / tensors:.2f} us per tensor)."
        )
    return {("docs/update_pass.md", "reposition-host"): f"{table}{above} {one_line(prov)}"}


# --------------------------------------------------------------------------- linear_loss: fused LM head on the CPU

LINEAR_LABELS = {
    "materialised": "materialised (`hidden @ W^T`, then `grpo_loss`)",
    "sfpo_fused": "`linear_grpo_loss`, default chunk",
    "sfpo_fused_c256": "`linear_grpo_loss`, `chunk_size=256`",
    "verl_fused_linear": "verl `FusedLinearForPPO` + the same loss math",
}


def linear_loss_commands(ctx: Context) -> list[Command]:
    size = ["--rounds", "2"] if ctx.quick else ["--rounds", "15"]
    csv = str(ctx.work / "linear-loss-cpu.csv")
    return [Command([ctx.python, _script("measure_linear_loss.py"), *size, "--csv", csv], {"OMP_NUM_THREADS": "1"})]


def linear_loss_collect(ctx: Context, timed: list) -> tuple[list[Path], dict]:
    return [copy(ctx.work / "linear-loss-cpu.csv", ctx.results("linear-loss-cpu.csv"))], {}


def linear_loss_render(ctx: Context) -> dict[tuple[str, str], str]:
    def row(r: dict) -> list[str]:
        return [
            LINEAR_LABELS.get(r["row"], r["row"]),
            *(number(r[k], "{:.1f}") for k in ("median_ms", "min_ms", "max_ms")),
            number(r["materialised_over_this"], "{:.2f}"),
            number(r["largest_tensor_mib"], "{:.2f}"),
        ]

    header = ["row", "median ms", "min", "max", "materialised / this", "largest tensor MiB"]
    prov, table = _table_of(ctx, "linear_loss", "linear-loss-cpu.csv", row, header, right=(1, 2, 3, 4, 5))
    first = read_csv(ctx.results("linear-loss-cpu.csv"))[0]
    shape = f"N = {first['tokens']} tokens, H = {first['hidden']}, V = {first['vocab']}, {first['dtype']}, forward + backward, {first['n']} rounds"
    return {("docs/linear_loss.md", "linear-loss-cpu"): f"{shape}:\n\n{table}\n\n{one_line(prov)}"}


# --------------------------------------------------------------------------- bench_cpu: pytest bench/ --benchmark-only

OUTCOME = re.compile(r"=+ (.*\d+ (?:passed|skipped|failed|deselected).*) in [0-9.]+s")


def bench_cpu_commands(ctx: Context) -> list[Command]:
    only = (
        ["-k", "test_reposition and fp32 and torch or test_training_step and grpo and not on_policy"]
        if ctx.quick
        else []
    )
    out = []
    for name, env in (("bench-cpu", {}), ("bench-cpu-triton", {"TRITON_INTERPRET": "1"})):
        json_path = str(ctx.work / f"{name}.json")
        argv = [ctx.python, "-m", "pytest", "bench/", "--benchmark-only", "-p", "no:cacheprovider", *only]
        out.append(Command([*argv, f"--benchmark-json={json_path}"], env, () if env else ("TRITON_INTERPRET",)))
    for name in ("bench-cpu", "bench-cpu-triton"):
        md = str(ctx.work / f"{name}-summary.md")
        out.append(Command([ctx.python, str(Path("bench") / "summary.py"), str(ctx.work / f"{name}.json"), "-o", md]))
    return out


def bench_cpu_collect(ctx: Context, timed: list) -> tuple[list[Path], dict]:
    rows, written = [], []
    for name, t in zip(("bench-cpu", "bench-cpu-triton"), timed[:2], strict=True):
        outcome = next((m.group(1) for line in reversed(t.tail) if (m := OUTCOME.search(line))), "")
        rows.append(
            {
                "run": name,
                "command": t.command,
                "outcome": outcome,
                "wall_s": t.wall_s,
                "cpu_s": t.cpu_s,
                "torch_threads": t.torch_threads,
                "load1_before": t.load_before[0] if t.load_before else "",
                "load1_after": t.load_after[0] if t.load_after else "",
            }
        )
        written.append(copy(ctx.work / f"{name}-summary.md", ctx.results(f"{name}-summary.md")))
    return [write_csv(ctx.results("bench-cpu-time.csv"), rows), *written], {}


def bench_cpu_render(ctx: Context) -> dict[tuple[str, str], str]:
    def row(r: dict) -> list[str]:
        return [
            f"`{r['command']}`",
            r["outcome"] or "n/a",
            duration(float(r["wall_s"])),
            duration(float(r["cpu_s"])),
            r["torch_threads"] or "n/a",
        ]

    header = ["command", "rows", "wall-clock", "CPU time", "torch threads"]
    prov, table = _table_of(ctx, "bench_cpu", "bench-cpu-time.csv", row, header)
    text = (
        f"{table}\n\nThe summaries: `docs/results/bench-cpu-summary.md`, `docs/results/bench-cpu-triton-summary.md` "
        f"(CPU timings, which say nothing about the GPU targets). {one_line(prov)}"
    )
    return {("bench/README.md", "bench-cpu-time"): text}


# --------------------------------------------------------------------------- vllm_step: one iteration, HF vs vLLM

VLLM_STAGES = ("gen", "reward", "old_log_prob", "update_actor", "sync_weights", "step")


def vllm_step_commands(ctx: Context) -> list[Command]:
    json_path = str(ctx.work / "vllm-step.json")
    argv = [
        ctx.vllm_python,
        "-m",
        "pytest",
        "bench/test_bench_vllm_rollout.py",
        "--benchmark-only",
        "-p",
        "no:cacheprovider",
    ]
    return [Command([*argv, f"--benchmark-json={json_path}"], {"OMP_NUM_THREADS": "1"})]


def vllm_step_collect(ctx: Context, timed: list) -> tuple[list[Path], dict]:
    data = json.loads((ctx.work / "vllm-step.json").read_text())
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        for engine in ("hf", "vllm"):
            for stage in VLLM_STAGES:
                t = info.get(f"{engine}/timing_s/{stage}")
                if t:
                    rows.append(
                        {
                            "setting": info.get("setting"),
                            "engine": engine,
                            "stage": stage,
                            "median_ms": round(1e3 * t["median"], 2),
                            "min_ms": round(1e3 * t["min"], 2),
                            "max_ms": round(1e3 * t["max"], 2),
                            "n": t["n"],
                            "vllm_start_s": round(info.get("vllm_start_s", float("nan")), 2),
                            "response_length_mean": round(info.get(f"{engine}/response_length_mean", float("nan")), 2),
                            "torch_threads": info.get("torch_threads"),
                        }
                    )
    if not rows:
        raise ValueError(f"{ctx.work / 'vllm-step.json'}: no benchmark rows (did the benchmarks skip?)")
    return [write_csv(ctx.results("vllm-step.csv"), rows)], {}


def vllm_step_render(ctx: Context) -> dict[tuple[str, str], str]:
    prov = ctx.provenance("vllm_step")
    rows = read_csv(ctx.results("vllm-step.csv"))
    cells = {(r["setting"], r["engine"], r["stage"]): r for r in rows}
    columns = [(s, e) for s in dict.fromkeys(r["setting"] for r in rows) for e in ("hf", "vllm")]

    def cell(key) -> str:
        r = cells.get(key)
        if r is None:
            return "n/a"
        if float(r["max_ms"]) == 0:
            return "0"
        return f"{number(r['median_ms'], '{:.1f}')} ({number(r['min_ms'], '{:.1f}')}-{number(r['max_ms'], '{:.1f}')})"

    table = md_table(
        ["stage", *(f"`{s}` {'HF' if e == 'hf' else 'vLLM'}" for s, e in columns)],
        [[s, *(cell((setting, e, s)) for setting, e in columns)] for s in VLLM_STAGES],
    )
    starts = {r["setting"]: r["vllm_start_s"] for r in rows}
    start = ", ".join(f"`{s}` {number(v, '{:.1f}')} s" for s, v in starts.items())
    ratios = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        parts = []
        for stage in ("gen", "step"):
            hf, vllm = cells.get((setting, "hf", stage)), cells.get((setting, "vllm", stage))
            if hf and vllm and float(hf["median_ms"]) > 0:
                parts.append(f"{stage} {float(vllm['median_ms']) / float(hf['median_ms']):.2f}x")
        length = cells.get((setting, "hf", "step"), {}).get("response_length_mean", "")
        ratios.append(f"`{setting}` (mean response {number(length, '{:.1f}')} tokens): {', '.join(parts)}")
    text = (
        f"{quick_note(prov)}Milliseconds per iteration, median (min-max) of {rows[0]['n']} rounds:\n\n{table}\n\n"
        f"vLLM / HF medians: {'; '.join(ratios)}. vLLM engine start (`Trainer.create`: vLLM import, engine "
        f"start, first load and its check): {start}. {one_line(prov)}"
    )
    return {("docs/vllm.md", "vllm-step"): text}


# --------------------------------------------------------------------------- vllm_300: the main job with each engine

VLLM_RUNS = {"vllm": ["actor_rollout_ref.rollout.name=vllm"], "hf": []}


def vllm_300_commands(ctx: Context) -> list[Command]:
    quick = ["trainer.total_training_steps=2"] if ctx.quick else []
    return [
        Command(
            [
                ctx.vllm_python,
                "-m",
                "sfpo_train.cli",
                "train",
                *extra,
                "trainer.device=cpu",
                f"trainer.default_local_dir={ctx.work / 'vllm-300'}",
                f"trainer.experiment_name={engine}",
                "trainer.progress_bar=false",
                *quick,
            ]
        )
        for engine, extra in VLLM_RUNS.items()
    ]


def vllm_300_collect(ctx: Context, timed: list) -> tuple[list[Path], dict]:
    rows = []
    for engine, t in zip(VLLM_RUNS, timed, strict=True):
        run = ctx.work / "vllm-300" / engine
        metrics = read_metrics(run)
        gen, sync = stage_seconds(metrics, "gen"), stage_seconds(metrics, "sync_weights")
        checks = [
            float(r["rollout/sync_check_max_abs_diff"]) for r in metrics if "rollout/sync_check_max_abs_diff" in r
        ]
        rows.append(
            {
                "engine": engine,
                "sync_check_max_abs_diff": max(checks) if checks else "",
                "wall_s": t.wall_s,
                "cpu_s": t.cpu_s,
                "torch_threads": t.torch_threads,
                **run_facts(run),
                "gen_median_ms": round(1e3 * sorted(gen)[len(gen) // 2], 2) if gen else "",
                "sync_median_ms": round(1e3 * sorted(sync)[len(sync) // 2], 2) if sync and max(sync) > 0 else "",
            }
        )
    return [write_csv(ctx.results("vllm-300.csv"), rows)], {}


def vllm_300_render(ctx: Context) -> dict[tuple[str, str], str]:
    def row(r: dict) -> list[str]:
        curve = ", ".join(r["val_curve"].split())
        return [
            "vLLM" if r["engine"] == "vllm" else "HF",
            curve,
            duration(float(r["step_time_s"])),
            number(r["gen_median_ms"], "{:.0f} ms"),
            number(r["sync_median_ms"], "{:.0f} ms") if r["sync_median_ms"] else "-",
        ]

    header = ["engine", "greedy test accuracy at step: value", "step time (sum)", "gen median", "sync median"]
    prov, table = _table_of(ctx, "vllm_300", "vllm-300.csv", row, header)
    checks = [
        r["sync_check_max_abs_diff"] for r in read_csv(ctx.results("vllm-300.csv")) if r["sync_check_max_abs_diff"]
    ]
    check = f" The sync checks logged `rollout/sync_check_max_abs_diff` up to {float(checks[0]):.1e}." if checks else ""
    return {("docs/vllm.md", "vllm-300"): f"{table}\n\n{check} {one_line(prov)}".replace("\n\n ", "\n\n")}


# --------------------------------------------------------------------------- verl_cpu: verl's Ray job on the CPU

VERL_RUNS = (
    ("2 iterations, 1 rank", "verl-1rank", [], "1"),
    ("resume to iteration 3, 1 rank", "verl-1rank", ["trainer.total_training_steps=3"], "1"),
    ("2 iterations, 2 ranks", "verl-2rank", [], "2"),
)


def verl_cpu_commands(ctx: Context) -> list[Command]:
    script = str(Path("examples") / "verl" / "cpu-smoke.sh")
    return [
        Command(["bash", script, str(ctx.work / out), *extra], {"PYTHON": ctx.python, "SFPO_SMOKE_RANKS": ranks})
        for _, out, extra, ranks in VERL_RUNS
    ]


def _verl_steps(metrics_dir: Path, since: str) -> list[dict]:
    """verl's file-logger rows (``{"step", "data"}``) of the invocation that started at ``since``: cpu-smoke.sh
    names each invocation's file by its start time (UTC, ``%Y%m%dT%H%M%S``), so it is the first at or after it."""
    stamp = since.replace("-", "").replace(":", "")[:15]
    files = sorted(p for p in metrics_dir.glob("*.jsonl") if p.stem >= stamp)
    rows = []
    for line in files[0].read_text().splitlines() if files else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row.get("data", row))
    return rows


def verl_cpu_collect(ctx: Context, timed: list) -> tuple[list[Path], dict]:
    rows = []
    for (label, out, _, ranks), t in zip(VERL_RUNS, timed, strict=True):
        steps = _verl_steps(ctx.work / out / "metrics", t.started)
        step_s = [float(r["timing_s/step"]) for r in steps if "timing_s/step" in r]
        update_s = [float(r["timing_s/update_actor"]) for r in steps if "timing_s/update_actor" in r]
        rows.append(
            {
                "run": label,
                "ranks": ranks,
                "wall_s": t.wall_s,
                "cpu_s": t.cpu_s,
                "iterations": len(step_s),
                "iteration_s": " ".join(f"{s:.1f}" for s in step_s),
                "update_actor_s": " ".join(f"{s:.2f}" for s in update_s),
            }
        )
    return [write_csv(ctx.results("verl-cpu-smoke.csv"), rows)], {}


def verl_cpu_render(ctx: Context) -> dict[tuple[str, str], str]:
    def row(r: dict) -> list[str]:
        iters = [float(x) for x in r["iteration_s"].split()]
        updates = [float(x) for x in r["update_actor_s"].split()]
        return [
            r["run"],
            duration(float(r["wall_s"])),
            spread(iters),
            spread(updates, "{:.2f}"),
            duration(float(r["cpu_s"])),
        ]

    header = ["`examples/verl/cpu-smoke.sh`", "wall-clock", "iteration s", "update_actor s", "CPU time of the driver"]
    prov, table = _table_of(ctx, "verl_cpu", "verl-cpu-smoke.csv", row, header)
    text = (
        f"{table}\n\nThe rest of the wall-clock is start-up (Ray, TransferQueue, model loads). CPU time counts the "
        f"script and the processes it waited for, not Ray's daemons. {one_line(prov)}"
    )
    return {("docs/verl.md", "verl-cpu-smoke"): text}


# --------------------------------------------------------------------------- bench_gpu: bench/run_gpu.sh


def bench_gpu_commands(ctx: Context) -> list[Command]:
    return [
        Command(["bash", str(Path("bench") / "run_gpu.sh")], {"OUT": str(ctx.work / "bench-gpu"), "PYTHON": ctx.python})
    ]


def bench_gpu_collect(ctx: Context, timed: list) -> tuple[list[Path], dict]:
    src = ctx.work / "bench-gpu"
    meta = (src / "meta.txt").read_text()
    device = re.search(r"device: (.*)", meta)
    slug = re.sub(r"[^a-z0-9]+", "-", (device.group(1) if device else "gpu").lower()).strip("-")
    dst = ctx.root / "bench" / "results" / f"{slug}-{timed[0].started[:10]}"
    return [copy(p, dst / p.name) for p in sorted(src.iterdir()) if p.is_file()], {}


def bench_gpu_render(ctx: Context) -> dict[tuple[str, str], str]:
    return {}  # bench/results/ holds the run as run_gpu.sh wrote it (summary.md, meta.txt, the JSON)
