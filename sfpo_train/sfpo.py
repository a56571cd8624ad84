"""The SFPO update rule (paper Algorithm 1) as an object any training loop can drive.

One call of :meth:`SFPO.step` is one outer iteration s on one batch of rollouts:

1. ``alpha_s`` from the schedule, which depends only on earlier iterations' entropies;
2. if ``alpha_s > 0``: snapshot theta_0, call ``update_pass(batch)`` K times (Stage I,
   the fast trajectory), then ``theta <- theta_0 + alpha_s (theta_K - theta_0)``
   (Stage II, reposition);
3. one more ``update_pass(batch)`` (Stage III, slow correction); with
   ``alpha_s == 0`` this is the only call: plain GRPO;
4. record this iteration's entropy (``trigger_entropy``: the old-log-prob pass's,
   given by the caller or the first pass's, or the last update pass's) and update
   the trigger: a z-score of the newest entropy over a rolling window; once it fires at iteration s,
   iterations s+1 on use alpha 0 (``decay="hard"``) or decay to 0 linearly
   over ``decay_steps`` iterations (``decay="linear"``).

``update_pass(batch) -> dict`` is one ordinary policy-gradient pass including
its ``optimizer.step()``; optimizer state (Adam moments) carries through all
passes and is never repositioned. The learning-rate scheduler is the caller's,
stepped once per outer iteration. While ``alpha_s > 0`` a step is all or
nothing: any exception leaves the parameters at theta_0 and the schedule
untouched (:meth:`SFPO.step` says what it cannot undo). The snapshot is freed
before ``step`` returns: between iterations SFPO holds no memory beyond its
entropy window.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, fields
from typing import Any

import torch

import sfpo_kernels
from sfpo_train.clock import StageClock
from sfpo_train.restore import add_note, restore_theta0
from sfpo_train.sfpo_config import (  # noqa: F401  (the settings, re-exported: sfpo_train.sfpo is their public home)
    DECAYS,
    ENABLE_HELP,
    RESUMABLE_CHANGES,
    TRIGGER_ENTROPIES,
    TRIGGERS,
    ZSCORE_EPS,
    Setting,
    SFPOConfig,
    settings_schema,
)

STATE_VERSION = 1


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

    def _with_entropy(self, entropy: float) -> tuple[deque, float, int | None]:
        """``(entropies, last_zscore, fired_at)`` once this iteration's entropy is recorded; changes nothing."""
        window = deque(self.entropies, maxlen=self.config.zscore_window)
        window.append(entropy)
        zscore, fired_at = math.nan, self.fired_at
        if len(window) == self.config.zscore_window:
            zscore = entropy_zscore(window)
            if fired_at is None and self.config.entropy_control and trigger_fires(self.config, zscore):
                fired_at = self.iteration
        return window, zscore, fired_at

    def planned_passes(self) -> tuple[str, ...]:
        """The update passes the next :meth:`step` makes, in order.

        ``("fast",) * K + ("slow",)`` while alpha > 0 (no ``"slow"`` with
        ``slow_correction=False``), ``("slow",)`` once alpha is 0 (plain GRPO). A
        caller whose pass must behave differently on the last one (verl's
        worker steps its LR scheduler there) counts on this plan.
        """
        if self.alpha <= 0:
            return ("slow",)
        return ("fast",) * self.config.inner_steps + (("slow",) if self.config.slow_correction else ())

    # ----------------------------------------------------------------- the step

    def step(self, update_pass: Callable[[Any], dict], batch: Any, entropy: float | torch.Tensor | None = None) -> dict:
        """Run one SFPO iteration on ``batch`` (the module docstring lists the stages).

        Args:
            update_pass: ``update_pass(batch) -> dict | None``, one policy-gradient pass including its
                ``optimizer.step()``. The dict maps metric names (str) to numbers ``float()`` converts
                (Python or numpy numbers, one-element tensors); NaN and inf pass through (a skipped
                step's ``grad_norm``), except for the entropy below.
            batch: handed to every pass as is.
            entropy: this iteration's entropy for the trigger, finite; ``None``: the ``"entropy"``
                of the first pass's metrics (required when ``config.entropy_control`` is on). With
                ``config.trigger_entropy="last_pass"`` the trigger reads the ``"entropy"`` of the
                last pass's metrics instead, and ``entropy`` must be None.

        Returns:
            every metric averaged over the passes that reported it, the last pass's values as
            ``sfpo/last/<key>``, ``sfpo/alpha``, ``sfpo/zscore``, ``sfpo/triggered``,
            ``sfpo/inner_steps_run``, ``sfpo/snapshot_bytes``, ``sfpo/entropy`` (the entropy the
            trigger recorded, NaN without one) and the stage times
            ``timing_s/sfpo_{snapshot,fast,reposition,slow}`` (0.0 for a stage that did not run).

        Failures (``alpha_s > 0``): the step is all or nothing. An exception from a pass
        (``KeyboardInterrupt`` included), from the check of a pass's metrics (made right after
        that pass), from the reposition, or an unknown or non-finite entropy (checked right after
        the first pass), restores the parameters to theta_0 and propagates; ``iteration``, the
        entropy window and the trigger are untouched, so calling ``step`` again retries the
        iteration and applies its update once. The snapshot is therefore held until Stage III and
        the entropy check are done: one copy of the trainable parameters stays allocated through
        Stage III too (``snapshot_offload="cpu"`` keeps it in pinned host memory, none on the GPU).

        The error that propagates is the failing pass's own, even when the pass changed the
        parameters' memory before raising: a parameter cast (``model.half()``) or given another
        shape or device (``p.data = ...``) gets a new tensor holding theta_0's values, dtype and
        shape (``p.data = ...`` again: a view of its old memory no longer aliases it), one whose
        storage was freed (``untyped_storage().resize_(0)``) gets it allocated again and refilled;
        a note on the error (``__notes__``) says so. Not undone: a parameter the pass replaced by
        a new object (``module.weight = nn.Parameter(...)``: the old object gets theta_0, the
        module keeps the new one), and a ``DTensor`` whose local shard changed shape or dtype
        (left as it is; the note names it).

        What SFPO cannot restore is the caller's: when pass ``j`` fails, the caller's optimizer
        has taken the steps of passes 1..j-1 and whatever pass ``j`` did before it raised (its
        step too when its metrics or entropy were rejected): AdamW's moments and step count
        have advanced by those ``k`` steps, and so has anything else the passes changed
        (gradients, RNG, an LR scheduler they step). Reload them from a checkpoint for a retry
        bit-identical to a run that never failed.

        With ``alpha_s == 0`` (plain GRPO) no snapshot is taken: if the single pass fails, or its
        metrics or entropy are rejected, its update is not undone, exactly as in plain GRPO; the
        schedule is still untouched.
        """
        cfg = self.config
        last_pass = cfg.trigger_entropy == "last_pass"
        if entropy is not None:
            if last_pass:
                raise ValueError(
                    "entropy= was given, but SFPOConfig.trigger_entropy='last_pass' reads the entropy of "
                    "the iteration's last update pass (its 'entropy' metric): pass entropy=None"
                )
            entropy = _as_entropy(entropy, "entropy")
        alpha = self.alpha
        plan = self.planned_passes()
        params = self._params()
        device = params[0].device if params else torch.device("cpu")
        timings = {"sfpo_snapshot": 0.0, "sfpo_fast": 0.0, "sfpo_reposition": 0.0, "sfpo_slow": 0.0}
        passes: list[dict[str, float]] = []
        snapshot_bytes = 0
        clock = StageClock(device)

        def run_pass() -> None:
            nonlocal entropy
            passes.append(_pass_metrics(update_pass(batch), len(passes) + 1, len(plan)))
            # Known before any later pass's result is accepted; recorded (like entropy=) whenever the first pass
            # reports one, so a caller whose first pass supplies the entropy keeps the window it would pass in.
            if entropy is None and not last_pass and (cfg.entropy_control or "entropy" in passes[0]):
                entropy = _pass_entropy(passes[0])

        snap = sfpo_kernels.snapshot(params, offload=cfg.snapshot_offload, backend=cfg.backend) if alpha > 0 else None
        try:
            if snap is not None:
                snapshot_bytes = snap.nbytes
                timings["sfpo_snapshot"] = clock.lap()
                for _ in range(plan.count("fast")):  # Stage I: the fast trajectory
                    run_pass()
                timings["sfpo_fast"] = clock.lap()
                if cfg.reposition and alpha < 1.0:  # Stage II
                    sfpo_kernels.reposition_(params, snap, alpha, backend=cfg.backend)
                timings["sfpo_reposition"] = clock.lap()
            if "slow" in plan:  # Stage III; with alpha 0 the only pass: plain GRPO
                run_pass()
                timings["sfpo_slow"] = clock.lap()
            if cfg.entropy_control and last_pass:  # the last pass's entropy, checked before the step is accepted
                if not passes:
                    raise ValueError(
                        "SFPOConfig.trigger_entropy='last_pass' reads the last update pass's entropy, but "
                        "this iteration ran none (inner_steps=0 with slow_correction=False)"
                    )
                entropy = _pass_entropy(passes[-1], last=True)
            if entropy is None and cfg.entropy_control:  # no pass ran (K = 0 without slow correction)
                entropy = _pass_entropy({})
            schedule = self._with_entropy(entropy) if entropy is not None else None
            metrics = _combine(passes)
        except BaseException as failure:
            if snap is not None:  # never leave the model half-way; the pass's error is the one that propagates
                for note in restore_theta0(snap, params, cfg.backend):
                    add_note(failure, note)
            raise
        finally:
            if snap is not None:
                snap.release()

        if schedule is not None:
            self.entropies, self.last_zscore, self.fired_at = schedule
        metrics.update(
            {
                "sfpo/alpha": alpha,
                "sfpo/zscore": self.last_zscore,
                "sfpo/triggered": float(self.fired_at is not None),
                "sfpo/inner_steps_run": float(plan.count("fast")),
                "sfpo/snapshot_bytes": float(snapshot_bytes),
                "sfpo/entropy": math.nan if entropy is None else float(entropy),  # what the trigger recorded
            }
        )
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

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the schedule from :meth:`state_dict`, all or nothing: every entry is checked first.

        ``version`` must equal :data:`STATE_VERSION`; ``iteration`` a non-negative integer;
        ``entropies`` a list of finite numbers, at most ``zscore_window`` of them; ``fired_at``
        None or an integer in ``[0, iteration)``; ``last_zscore`` a finite float or NaN (NaN until
        the window fills). The saved ``config`` must equal this one in every field that shapes the schedule
        and the update (a changed schedule cannot resume exactly); :data:`RESUMABLE_CHANGES`
        (``snapshot_offload``, ``backend``) may differ, e.g. to offload the snapshot when resuming
        on a smaller GPU. Older states: missing config fields take their defaults; missing
        ``entropies`` / ``fired_at`` / ``last_zscore`` mean empty / None / NaN.

        Raises:
            ValueError: naming the offending key and value; nothing is applied.
        """
        if not isinstance(state, Mapping) or "iteration" not in state:
            raise ValueError(f"state is not an SFPO state_dict (no 'iteration'), got {type(state).__name__}")
        version = state.get("version")
        if not _is_int(version) or version != STATE_VERSION:
            raise ValueError(f"state['version'] is {version!r}; expected {STATE_VERSION} (a state_dict() of this SFPO)")
        self._check_saved_config(state.get("config", {}))
        iteration = state["iteration"]
        if not _is_int(iteration) or iteration < 0:
            raise ValueError(f"state['iteration'] must be a non-negative integer, got {iteration!r}")
        entropies = state.get("entropies", [])
        if not isinstance(entropies, (list, tuple)):
            raise ValueError(f"state['entropies'] must be a list of finite numbers, got {entropies!r}")
        window = [_finite_float(h) for h in entropies]
        for i, (h, value) in enumerate(zip(entropies, window)):
            if value is None:
                raise ValueError(f"state['entropies'][{i}] must be a finite number, got {h!r}")
        if len(entropies) > self.config.zscore_window:
            raise ValueError(
                f"state['entropies'] holds {len(entropies)} entries, more than "
                f"zscore_window={self.config.zscore_window}"
            )
        fired_at = state.get("fired_at")
        if fired_at is not None and not (_is_int(fired_at) and 0 <= fired_at < iteration):
            raise ValueError(f"state['fired_at'] must be None or an integer in [0, {iteration}), got {fired_at!r}")
        last_zscore = state.get("last_zscore", math.nan)
        zscore = _finite_float(last_zscore, allow_nan=True)
        if zscore is None:
            raise ValueError(f"state['last_zscore'] must be a float or NaN, got {last_zscore!r}")

        self.iteration = int(iteration)
        self.entropies = deque(window, maxlen=self.config.zscore_window)
        self.fired_at = None if fired_at is None else int(fired_at)
        self.last_zscore = zscore

    def _check_saved_config(self, saved) -> None:
        if not isinstance(saved, Mapping):
            raise ValueError(f"state['config'] must be a dict of SFPOConfig fields, got {saved!r}")
        saved = {**asdict(SFPOConfig()), **saved}  # older states: defaults for new fields
        current = asdict(self.config)
        names = {f.name for f in fields(SFPOConfig)} - set(RESUMABLE_CHANGES)
        diff = {k: (saved.get(k), current[k]) for k in names if saved.get(k) != current[k]}
        if diff:
            listed = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"the saved SFPO state was made with a different config ({listed})")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _finite_float(value, allow_nan: bool = False) -> float | None:
    """``float(value)`` for a real number (not a bool) that is finite (or NaN, if allowed); else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        x = float(value)
    except OverflowError:
        return None
    return x if math.isfinite(x) or (allow_nan and math.isnan(x)) else None


def _as_entropy(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _pass_metrics(result, number: int, total: int) -> dict[str, float]:
    """The metrics update pass ``number`` (of ``total``) returned, as floats; ``ValueError`` unless numbers."""
    if result is None:
        return {}
    if not isinstance(result, dict):
        raise ValueError(
            f"update_pass must return a dict of metrics (or None), got {type(result).__name__} "
            f"from update pass {number} of {total}"
        )
    out = {}
    for key, value in result.items():
        if not isinstance(key, str):
            raise ValueError(f"update pass {number} of {total} returned a metric named {key!r}; names must be strings")
        converted = _as_float(value)
        if converted is None:
            raise ValueError(
                f"update pass {number} of {total} returned {key}={value!r}; a metric must be a number "
                "(int, float, a one-element tensor)"
            )
        out[key] = converted
    return out


def _as_float(value) -> float | None:
    """``float(value)`` for a number or a one-element real tensor; None for anything else (strings included)."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    if isinstance(value, torch.Tensor) and (value.numel() != 1 or value.is_complex()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None


def _pass_entropy(metrics: dict[str, float], last: bool = False) -> float:
    """This iteration's entropy for the trigger from a pass's metrics (the first pass's, or with ``last`` the last's)."""
    if "entropy" not in metrics:
        if last:
            raise ValueError(
                "SFPOConfig.trigger_entropy='last_pass' needs the entropy of the iteration's last update "
                "pass: return 'entropy' from update_pass"
            )
        raise ValueError(
            "SFPO needs this iteration's entropy: pass entropy= to step() or return 'entropy' from update_pass"
        )
    return _as_entropy(metrics["entropy"], "update_pass()['entropy']")


def _combine(passes: list[dict]) -> dict:
    """Each metric averaged over the passes that reported it, plus the last pass's value as ``sfpo/last/<key>``."""
    out: dict[str, float] = {}
    keys = {k for p in passes for k in p}
    for key in sorted(keys):
        values = [float(p[key]) for p in passes if key in p]
        out[key] = sum(values) / len(values)
    for key, value in passes[-1].items() if passes else ():
        out[f"sfpo/last/{key}"] = float(value)
    return out
