"""How many torch threads ``sfpo train`` / ``compare`` / ``sweep`` and the benchmarks use, and why.

:func:`choose_threads` is the decision, from plain inputs: an explicit request,
``OMP_NUM_THREADS``, the model's parameter count, the CPUs this process may run
on (``os.sched_getaffinity``) and the 1-minute load average. In that order:

1. an explicit request (a caller's own setting) is used as given;
2. ``OMP_NUM_THREADS``, when set, is honoured (the first number of OpenMP's
   nested form ``"4,2"``; empty counts as unset);
3. otherwise: 1 thread with one CPU; 1 thread for a model under
   :data:`SMALL_MODEL_PARAMETERS` (the embedded default has 0.53M); else one
   thread per idle CPU, ``round(cpus - load)``, at least 1.

Why small models get one thread: their ops are small, so a second thread has
little to split and much to wait for, and a waiting OpenMP thread spins. On
cores other jobs use, the spinning thread takes CPU time from the one doing the
work: a newcomer measured 15 iterations of the embedded default under load 3-12
at 55-190 s of wall-clock and 44-90 s of CPU with 2 threads against 28 s and
18 s with 1. ``bench/measure/measure_threads.py`` measures the choice as whole
commands (docs/threads.md holds its table). The decision is made once, when a
command starts; a machine that gets busy later is not followed.

:func:`configure` reads the machine, decides, calls ``torch.set_num_threads``
and returns the line the commands print first.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

# Below this many parameters a run gets one thread unless OMP_NUM_THREADS says otherwise (see the docstring).
SMALL_MODEL_PARAMETERS = 2_000_000


@dataclass(frozen=True)
class ThreadChoice:
    """``threads`` for torch, the ``reason`` in a few words, and what decided it (``source``)."""

    threads: int
    reason: str
    source: str  # "requested", "OMP_NUM_THREADS" or "auto"


def parse_omp_num_threads(value: str | None) -> int | None:
    """``OMP_NUM_THREADS`` as a thread count: None when unset or empty; the first level of ``"4,2"``.

    Raises ``ValueError`` naming the variable for anything else (``"abc"``, ``"0"``).
    """
    if value is None or not value.strip():
        return None
    first = value.split(",")[0].strip()
    if not first.isdigit() or int(first) < 1:
        raise ValueError(f"OMP_NUM_THREADS={value!r}: must be a whole number >= 1 (the torch thread count)")
    return int(first)


def _millions(parameters: int) -> str:
    return f"{parameters / 1e6:.2f}M" if parameters < 1e8 else f"{parameters / 1e9:.2f}B"


def choose_threads(
    *,
    requested: int | None,
    omp_num_threads: str | None,
    parameters: int | None,
    cpus: int,
    load1: float | None,
) -> ThreadChoice:
    """The torch thread count for a run, from plain inputs (the rules are in the module docstring).

    ``requested``: a caller's explicit count (None: none); ``omp_num_threads``:
    the variable's text (None: unset); ``parameters``: the model's parameter count
    (None: unknown, no size limit); ``cpus``: CPUs this process may use;
    ``load1``: the 1-minute load average (None: unknown, taken as idle).
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads: must be a whole number >= 1, got {requested!r}")
        return ThreadChoice(requested, f"requested {requested}", "requested")
    from_env = parse_omp_num_threads(omp_num_threads)
    if from_env is not None:
        return ThreadChoice(from_env, f"OMP_NUM_THREADS={omp_num_threads.strip()}", "OMP_NUM_THREADS")
    if cpus < 1:
        raise ValueError(f"cpus: must be >= 1, got {cpus!r}")
    if load1 is not None and (math.isnan(load1) or load1 < 0):
        raise ValueError(f"load1: must be a load average >= 0, got {load1!r}")
    if cpus == 1:
        return ThreadChoice(1, "one CPU available", "auto")
    if parameters is not None and parameters < SMALL_MODEL_PARAMETERS:
        return ThreadChoice(
            1,
            f"chosen: a {_millions(parameters)}-parameter model gains little from a second thread, "
            "which spins while it waits when the cores are busy",
            "auto",
        )
    free = cpus - (load1 or 0.0)
    threads = max(1, min(cpus, math.floor(free + 0.5)))
    size = "model size unknown" if parameters is None else f"a {_millions(parameters)}-parameter model"
    return ThreadChoice(threads, f"chosen: {size}, one thread per idle CPU", "auto")


# --------------------------------------------------------------------------- the inputs, read from the machine


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_average() -> float | None:
    """The 1-minute load average, None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def safetensors_parameters(model_dir: str | Path) -> int | None:
    """The parameter count in a model directory's ``*.safetensors`` files, read from their headers (no weights
    loaded); None without such files or with one that cannot be read."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    try:
        for path in files:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            for name, entry in header.items():
                if name != "__metadata__":
                    total += math.prod(entry["shape"])
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return total


def config_parameters(config: dict) -> int | None:
    """An estimate of a decoder's parameter count from its ``config.json`` entries (Qwen2 / Llama layout: embeddings,
    attention with grouped KV heads and q/k/v biases, a gated MLP, RMSNorms); None where an entry is missing."""
    try:
        h, layers, inter, vocab = (
            int(config[k]) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
        )
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or h // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    attention = h * heads * head_dim * 2 + 2 * h * kv * head_dim + (heads + 2 * kv) * head_dim
    per_layer = attention + 3 * h * inter + 2 * h
    heads_out = 1 if config.get("tie_word_embeddings", True) else 2
    return vocab * h * heads_out + layers * per_layer + h


def model_parameters(model_cfg) -> int | None:
    """The parameter count of the model a run config's ``actor_rollout_ref.model`` section names: exact from its
    safetensors headers, or estimated from ``config.json`` with ``override_config`` applied (where that reshapes
    the model or ``random_init`` builds it); None when neither can be read."""
    path = model_cfg.get("path")
    if path is None:
        from sfpo_train.tasks import default_paths

        path = default_paths()["model"]
    overrides = dict(model_cfg.get("override_config") or {})
    if not overrides and not model_cfg.get("random_init"):
        exact = safetensors_parameters(path)
        if exact is not None:
            return exact
    try:
        with open(Path(path) / "config.json") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config_parameters({**config, **overrides}) if isinstance(config, dict) else None


def describe(choice: ThreadChoice, cpus: int, load1: float | None) -> str:
    """The line the commands print first: the thread count and why, the CPUs, the load."""
    if load1 is None:
        load = "load average unknown"
    else:
        load = f"load average {load1:.1f} (1 min)" + (" - busy, expect a slower run" if load1 > 0.75 * cpus else "")
    hint = "" if choice.source == "OMP_NUM_THREADS" else "; OMP_NUM_THREADS=N sets it"
    return f"{choice.threads} torch thread(s) ({choice.reason}), {cpus} CPU(s) available, {load}{hint}"


def configure(model_cfg=None, *, requested: int | None = None, parameters: int | None = None) -> str:
    """Choose the thread count for a run of ``model_cfg`` (an ``actor_rollout_ref.model`` section; None: model
    size unknown unless ``parameters`` gives it), set it with ``torch.set_num_threads`` and return
    :func:`describe`'s line. A model that cannot be read counts as of unknown size (the run reports the error)."""
    parse_omp_num_threads(os.environ.get("OMP_NUM_THREADS"))  # a bad value fails before torch loads
    import torch

    if parameters is None and model_cfg is not None:
        try:
            parameters = model_parameters(model_cfg)
        except (OSError, ValueError):
            parameters = None
    cpus, load1 = available_cpus(), load_average()
    choice = choose_threads(
        requested=requested,
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        parameters=parameters,
        cpus=cpus,
        load1=load1,
    )
    torch.set_num_threads(choice.threads)  # explicit, whatever imported torch first
    return describe(choice, cpus, load1)


def configure_for_run(preset: str, overrides: list[str], algorithm: str = "grpo") -> str:
    """:func:`configure` for the runs ``preset`` + ``overrides`` + ``algorithm`` make (compare, sweep); overrides
    the config cannot take leave the model size unknown here (the command itself then names them)."""
    import sfpo_train.trainer.config as config_lib

    try:
        cfg = config_lib.load_config(preset, overrides, algorithm)
    except ValueError:
        return configure(None)
    return configure(cfg.actor_rollout_ref.model)
