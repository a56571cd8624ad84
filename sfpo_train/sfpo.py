"""The SFPO update rule (paper Algorithm 1) as an object any training loop can drive.

One call of :meth:`SFPO.step` is one outer iteration s on one batch of rollouts:

1. ``alpha_s`` from the schedule, which depends only on earlier iterations' entropies;
2. if ``alpha_s > 0``: snapshot theta_0, call ``update_pass(batch)`` K times (Stage I,
   the fast trajectory), then ``theta <- theta_0 + alpha_s (theta_K - theta_0)``
   (Stage II, reposition);
3. one more ``update_pass(batch)`` (Stage III, slow correction); with
   ``alpha_s == 0`` this is the only call: plain GRPO;
4. record this iteration's entropy and update the trigger: a z-score of the
   newest entropy over a rolling window; once it fires at iteration s,
   iterations s+1 on use alpha 0 (``decay="hard"``) or decay to 0 linearly
   over ``decay_steps`` iterations (``decay="linear"``).

``update_pass(batch) -> dict`` is one ordinary policy-gradient pass including
its ``optimizer.step()``; optimizer state (Adam moments) carries through all
passes and is never repositioned. The learning-rate scheduler is the caller's,
stepped once per outer iteration. The snapshot is freed before ``step``
returns: between iterations SFPO holds no memory beyond its entropy window.
"""

from __future__ import annotations

import math
import numbers
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

import sfpo_kernels

TRIGGERS = ("up", "abs", "down")
DECAYS = ("hard", "linear")
ZSCORE_EPS = 1e-9
STATE_VERSION = 1


@dataclass(frozen=True)
class SFPOConfig:
    """SFPO's hyperparameters (paper notation in brackets).

    Attributes:
        inner_steps: K, fast-trajectory passes per iteration (>= 0).
        alpha: alpha_0, reposition step in [0, 1] (1 = keep theta_K, 0 = plain GRPO).
        zscore_window: omega, entropies in the rolling window (>= 2).
        zscore_threshold: tau, the z-score that fires the trigger (> 0).
        trigger: "up" fires on z >= tau (the authors' code), "abs" on |z| >= tau
            (the paper's Algorithm 1), "down" on z <= -tau.
        decay: after the trigger, "hard" sets alpha to 0 at once, "linear" takes it
            to 0 over ``decay_steps`` iterations.
        decay_steps: iterations of the linear decay (>= 1 with ``decay="linear"``).
        slow_correction: run Stage III (ablation: False skips it while alpha > 0).
        snapshot_offload: "none" or "cpu" (pinned host memory, no GPU memory).
        reposition: run Stage II (ablation: False keeps theta_K, i.e. alpha = 1 there).
        entropy_control: the entropy trigger (ablation: False keeps alpha constant).
        backend: kernel backend for snapshot / reposition (None: the default).
    """

    inner_steps: int = 3
    alpha: float = 0.8
    zscore_window: int = 30
    zscore_threshold: float = 1.0
    trigger: str = "up"
    decay: str = "hard"
    decay_steps: int = 0
    slow_correction: bool = True
    snapshot_offload: str = "none"
    reposition: bool = True
    entropy_control: bool = True
    backend: str | None = None

    def __post_init__(self):
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"SFPOConfig.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("inner_steps", "zscore_window", "decay_steps"):
            need(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool), name, "an integer")
        for name in ("alpha", "zscore_threshold"):
            value = getattr(self, name)
            need(isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value), name,
                 "a finite number")  # fmt: skip
        for name in ("slow_correction", "reposition", "entropy_control"):
            need(isinstance(getattr(self, name), bool), name, "True or False")
        need(self.inner_steps >= 0, "inner_steps", ">= 0")
        need(0.0 <= self.alpha <= 1.0, "alpha", "in [0, 1]")
        need(self.zscore_window >= 2, "zscore_window", ">= 2")
        need(self.zscore_threshold > 0, "zscore_threshold", "> 0")
        need(self.trigger in TRIGGERS, "trigger", f"one of {', '.join(TRIGGERS)}")
        need(self.decay in DECAYS, "decay", f"one of {', '.join(DECAYS)}")
        need(self.decay != "linear" or self.decay_steps >= 1, "decay_steps", ">= 1 with decay='linear'")
        need(self.decay_steps >= 0, "decay_steps", ">= 0")
        need(self.snapshot_offload in sfpo_kernels.reposition.OFFLOAD_MODES, "snapshot_offload", "'none' or 'cpu'")
        need(self.backend is None or self.backend in sfpo_kernels.BACKENDS, "backend",
             f"None or one of {', '.join(sfpo_kernels.BACKENDS)}")  # fmt: skip


# --------------------------------------------------------------------------- functional core


def scheduled_alpha(config: SFPOConfig, iteration: int, fired_at: int | None) -> float:
    """alpha for ``iteration`` given the iteration the trigger fired at (None: not yet)."""
    if not config.entropy_control or fired_at is None or iteration <= fired_at:
        return float(config.alpha)
    if config.decay == "hard":
        return 0.0
    return float(config.alpha) * max(0.0, 1.0 - (iteration - fired_at) / config.decay_steps)


def entropy_zscore(window: Iterable[float]) -> float:
    """z-score of the newest entry over the whole window (population std), ``(H - mean) / (std + 1e-9)``."""
    values = list(window)
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    return (values[-1] - mean) / (std + ZSCORE_EPS)


def trigger_fires(config: SFPOConfig, z: float) -> bool:
    tau = config.zscore_threshold
    if config.trigger == "up":
        return z >= tau
    if config.trigger == "down":
        return z <= -tau
    return abs(z) >= tau


# --------------------------------------------------------------------------- the object


def _trainable(params_or_module) -> Callable[[], list[torch.Tensor]]:
    """A function returning the parameters to snapshot now (requires_grad may change between iterations)."""
    if isinstance(params_or_module, torch.nn.Module):
        module = params_or_module
        return lambda: [p for p in module.parameters() if p.requires_grad]
    if isinstance(params_or_module, torch.Tensor):
        raise ValueError("params_or_module must be an nn.Module or a list of parameters, got a single tensor")
    items = list(params_or_module)
    params: list[torch.Tensor] = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and "params" in item:  # optimizer-style parameter groups
            params.extend(item["params"])
        elif isinstance(item, torch.Tensor):
            params.append(item)
        else:
            raise ValueError(f"params_or_module[{i}] must be a tensor or a parameter group, got {type(item).__name__}")
    return lambda: [p for p in params if p.requires_grad]


class SFPO:
    """Slow-Fast Policy Optimization around an ordinary policy-gradient pass.

    Example::

        sfpo = SFPO(model, SFPOConfig(inner_steps=3, alpha=0.8))
        for batch in batches:                       # one batch of rollouts per iteration
            metrics = sfpo.step(update_pass, batch)  # update_pass runs loss.backward(); optimizer.step()
            lr_scheduler.step()                      # once per outer iteration
    """

    def __init__(self, params_or_module, config: SFPOConfig | None = None):
        self.config = config if config is not None else SFPOConfig()
        if not isinstance(self.config, SFPOConfig):
            raise ValueError(f"config must be an SFPOConfig, got {type(self.config).__name__}")
        self._params = _trainable(params_or_module)
        self.iteration = 0
        self.entropies: deque[float] = deque(maxlen=self.config.zscore_window)
        self.fired_at: int | None = None
        self.last_zscore = math.nan

    # ----------------------------------------------------------------- schedule

    @property
    def alpha(self) -> float:
        """alpha the next :meth:`step` will use."""
        return scheduled_alpha(self.config, self.iteration, self.fired_at)

    def _record_entropy(self, entropy: float) -> None:
        self.entropies.append(entropy)
        self.last_zscore = math.nan
        if len(self.entropies) == self.config.zscore_window:
            self.last_zscore = entropy_zscore(self.entropies)
            if self.fired_at is None and self.config.entropy_control and trigger_fires(self.config, self.last_zscore):
                self.fired_at = self.iteration

    # ----------------------------------------------------------------- the step

    def step(self, update_pass: Callable[[Any], dict], batch: Any, entropy: float | torch.Tensor | None = None) -> dict:
        """Run one SFPO iteration on ``batch``; returns metrics (see the module docstring)."""
        if entropy is not None:
            entropy = _as_entropy(entropy, "entropy")
        alpha = self.alpha
        cfg = self.config
        params = self._params()
        device = params[0].device if params else torch.device("cpu")
        timings = {"sfpo_snapshot": 0.0, "sfpo_fast": 0.0, "sfpo_reposition": 0.0, "sfpo_slow": 0.0}
        passes: list[dict] = []
        snapshot_bytes = 0
        clock = _StageClock(device)

        if alpha > 0:
            snap = sfpo_kernels.snapshot(params, offload=cfg.snapshot_offload, backend=cfg.backend)
            snapshot_bytes = snap.nbytes
            timings["sfpo_snapshot"] = clock.lap()
            try:
                try:
                    for _ in range(cfg.inner_steps):  # Stage I: the fast trajectory
                        passes.append(_metrics_of(update_pass(batch)))
                except BaseException:
                    snap.restore_(params, backend=cfg.backend)  # never leave the model half-way
                    raise
                timings["sfpo_fast"] = clock.lap()
                if cfg.reposition and alpha < 1.0:  # Stage II
                    sfpo_kernels.reposition_(params, snap, alpha, backend=cfg.backend)
                timings["sfpo_reposition"] = clock.lap()
            finally:
                snap.release()
            if cfg.slow_correction:  # Stage III
                passes.append(_metrics_of(update_pass(batch)))
                timings["sfpo_slow"] = clock.lap()
        else:  # plain GRPO: the slow pass alone
            passes.append(_metrics_of(update_pass(batch)))
            timings["sfpo_slow"] = clock.lap()

        if entropy is None and cfg.entropy_control:
            first = passes[0] if passes else {}
            if "entropy" not in first:
                raise ValueError(
                    "SFPO needs this iteration's entropy: pass entropy= to step() or return 'entropy' from update_pass"
                )
            entropy = _as_entropy(first["entropy"], "update_pass()['entropy']")
        if entropy is not None:
            self._record_entropy(entropy)

        metrics = _combine(passes)
        metrics.update({
            "sfpo/alpha": alpha,
            "sfpo/zscore": self.last_zscore,
            "sfpo/triggered": float(self.fired_at is not None),
            "sfpo/inner_steps_run": float(cfg.inner_steps if alpha > 0 else 0),
            "sfpo/snapshot_bytes": float(snapshot_bytes),
        })  # fmt: skip
        metrics.update({f"timing_s/{k}": v for k, v in timings.items()})
        self.iteration += 1
        return metrics

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "iteration": self.iteration,
            "entropies": list(self.entropies),
            "fired_at": self.fired_at,
            "last_zscore": self.last_zscore,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the schedule; the saved config must equal this one (a changed schedule cannot resume exactly)."""
        if not isinstance(state, dict) or "iteration" not in state:
            raise ValueError("state is not an SFPO state_dict (no 'iteration')")
        saved = {**asdict(SFPOConfig()), **state.get("config", {})}  # older states: defaults for new fields
        current = asdict(self.config)
        names = {f.name for f in fields(SFPOConfig)}
        diff = {k: (saved.get(k), current[k]) for k in names if saved.get(k) != current[k]}
        if diff:
            listed = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"the saved SFPO state was made with a different config ({listed})")
        entropies = [float(x) for x in state.get("entropies", [])]
        if len(entropies) > self.config.zscore_window or not all(math.isfinite(x) for x in entropies):
            raise ValueError("state['entropies'] holds more entries than the window, or non-finite ones")
        self.iteration = int(state["iteration"])
        self.entropies = deque(entropies, maxlen=self.config.zscore_window)
        self.fired_at = None if state.get("fired_at") is None else int(state["fired_at"])
        self.last_zscore = float(state.get("last_zscore", math.nan))


def _as_entropy(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _metrics_of(result) -> dict:
    if result is None:
        return {}
    if not isinstance(result, dict):
        raise ValueError(f"update_pass must return a dict of metrics (or None), got {type(result).__name__}")
    return result


def _combine(passes: list[dict]) -> dict:
    """Each metric averaged over the passes that reported it, plus the last pass's value as ``sfpo/last/<key>``."""
    out: dict[str, float] = {}
    keys = {k for p in passes for k in p}
    for key in sorted(keys):
        values = [float(p[key]) for p in passes if key in p]
        out[key] = sum(values) / len(values)
    for key, value in (passes[-1].items() if passes else ()):
        out[f"sfpo/last/{key}"] = float(value)
    return out


class _StageClock:
    """Wall-clock laps; on CUDA it synchronises first so a lap holds the GPU work, not its launch."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._sync()
        self.last = time.perf_counter()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def lap(self) -> float:
        self._sync()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed
