"""One SFPO iteration whose update passes the caller runs: the stages of :meth:`SFPO.step`, driven from outside.

:meth:`SFPO.step` owns its pass loop (``update_pass(batch)`` K + 1 times). A
trainer that owns the loop itself (TRL's ``Trainer`` runs every optimizer step
and calls back after each) drives the same stages one event at a time::

    iteration = sfpo.begin()            # alpha_s and the plan; theta_0 snapshot when alpha_s > 0
    while iteration.next_pass:          # "fast" K times, then "slow" (only "slow" once alpha is 0)
        metrics = run_one_pass()        # the caller's pass, optimizer.step() included
        iteration.pass_done(metrics)    # after the last fast pass: the reposition (Stage II)
    result = iteration.finish()         # the trigger is updated, the snapshot freed

and calls ``iteration.abort(error)`` on any failure in between (theta_0 is put
back while alpha_s > 0). ``SFPO.step`` is exactly that loop, so there is one
copy of the rule.
"""

from __future__ import annotations

import math
import numbers

import torch

import sfpo_kernels
from sfpo_train.clock import StageClock
from sfpo_train.restore import add_note, restore_theta0

STAGES = ("sfpo_snapshot", "sfpo_fast", "sfpo_reposition", "sfpo_slow")


class SFPOIteration:
    """Iteration s of an :class:`~sfpo_train.sfpo.SFPO`, from the snapshot to the trigger update.

    Attributes:
        alpha: alpha_s, fixed when the iteration begins.
        plan: the passes in order, ``("fast",) * K + ("slow",)`` while alpha_s > 0, ``("slow",)`` after.

    The schedule (``sfpo.iteration``, the entropy window, the trigger) changes only in
    :meth:`finish`; until then :meth:`abort` leaves the SFPO object as it was.
    """

    def __init__(self, sfpo, entropy: float | torch.Tensor | None = None):  # sfpo: the SFPO whose iteration this is
        cfg = sfpo.config
        self._sfpo = sfpo
        self._last_pass_entropy = cfg.trigger_entropy == "last_pass"
        if entropy is not None:
            if self._last_pass_entropy:
                raise ValueError(
                    "entropy= was given, but SFPOConfig.trigger_entropy='last_pass' reads the entropy of "
                    "the iteration's last update pass (its 'entropy' metric): pass entropy=None"
                )
            entropy = _as_entropy(entropy, "entropy")
        self._entropy = entropy
        self.alpha = sfpo.alpha
        self.plan = sfpo.planned_passes()
        self._params = sfpo._params()
        device = self._params[0].device if self._params else torch.device("cpu")
        self._passes: list[dict[str, float]] = []
        self._timings = dict.fromkeys(STAGES, 0.0)
        self._clock = StageClock(device)
        self._finished = False
        self._snap = (
            sfpo_kernels.snapshot(self._params, offload=cfg.snapshot_offload, backend=cfg.backend)
            if self.alpha > 0
            else None
        )
        self._snapshot_bytes = self._snap.nbytes if self._snap is not None else 0
        if self._snap is not None:
            self._timings["sfpo_snapshot"] = self._clock.lap()
            if self.next_pass != "fast":  # K = 0: the fast trajectory is empty
                self._end_fast_stage()

    @property
    def next_pass(self) -> str | None:
        """``"fast"`` or ``"slow"``: the pass to run now; None once every planned pass is done."""
        done = len(self._passes)
        return self.plan[done] if done < len(self.plan) else None

    @property
    def passes_done(self) -> int:
        return len(self._passes)

    def pass_done(self, metrics) -> None:
        """Record the pass the caller just ran (its ``dict`` of metrics, or None); after the last fast one, reposition.

        The metrics are checked as :meth:`SFPO.step` checks ``update_pass``'s result
        (``ValueError`` naming the pass and the key). The iteration's entropy is taken
        from the first pass's ``"entropy"`` when none was given to :meth:`SFPO.begin`.
        """
        stage = self.next_pass
        if stage is None or self._finished:
            raise RuntimeError(f"pass_done() after every planned pass of this iteration ran ({len(self.plan)})")
        self._passes.append(_pass_metrics(metrics, len(self._passes) + 1, len(self.plan)))
        # Known before any later pass's result is accepted; recorded (like entropy=) whenever the first pass
        # reports one, so a caller whose first pass supplies the entropy keeps the window it would pass in.
        cfg = self._sfpo.config
        if (
            self._entropy is None
            and not self._last_pass_entropy
            and (cfg.entropy_control or "entropy" in self._passes[0])
        ):
            self._entropy = _pass_entropy(self._passes[0])
        if stage == "fast":
            if self.next_pass != "fast":
                self._end_fast_stage()
        else:
            self._timings["sfpo_slow"] = self._clock.lap()

    def _end_fast_stage(self) -> None:
        """Stage II once the fast trajectory is done: theta <- theta_0 + alpha (theta_K - theta_0)."""
        cfg = self._sfpo.config
        self._timings["sfpo_fast"] = self._clock.lap()
        if cfg.reposition and self.alpha < 1.0:
            sfpo_kernels.reposition_(self._params, self._snap, self.alpha, backend=cfg.backend)
        self._timings["sfpo_reposition"] = self._clock.lap()

    def finish(self) -> dict:
        """Record the entropy, update the trigger, free the snapshot; returns the metrics :meth:`SFPO.step` returns.

        Raises ``ValueError`` for a missing or non-finite entropy (nothing changes: call
        :meth:`abort`). ``RuntimeError`` when planned passes have not run.
        """
        if self._finished:
            raise RuntimeError("finish() was already called for this iteration")
        if self.next_pass is not None:
            raise RuntimeError(
                f"finish() after {len(self._passes)} of the {len(self.plan)} planned passes {self.plan}: "
                "run the rest first (or abort())"
            )
        sfpo, cfg, passes, entropy = self._sfpo, self._sfpo.config, self._passes, self._entropy
        if cfg.entropy_control and self._last_pass_entropy:  # the last pass's entropy, checked before acceptance
            if not passes:
                raise ValueError(
                    "SFPOConfig.trigger_entropy='last_pass' reads the last update pass's entropy, but "
                    "this iteration ran none (inner_steps=0 with slow_correction=False)"
                )
            entropy = _pass_entropy(passes[-1], last=True)
        if entropy is None and cfg.entropy_control:  # no pass ran (K = 0 without slow correction)
            entropy = _pass_entropy({})
        schedule = sfpo._with_entropy(entropy) if entropy is not None else None
        metrics = _combine(passes)

        self._release()
        self._finished = True
        if schedule is not None:
            sfpo.entropies, sfpo.last_zscore, sfpo.fired_at = schedule
        metrics.update(
            {
                "sfpo/alpha": self.alpha,
                "sfpo/zscore": sfpo.last_zscore,
                "sfpo/triggered": float(sfpo.fired_at is not None),
                "sfpo/inner_steps_run": float(self.plan.count("fast")),
                "sfpo/snapshot_bytes": float(self._snapshot_bytes),
                "sfpo/entropy": math.nan if entropy is None else float(entropy),  # what the trigger recorded
            }
        )
        metrics.update({f"timing_s/{k}": v for k, v in self._timings.items()})
        sfpo.iteration += 1
        return metrics

    def abort(self, failure: BaseException | None = None) -> None:
        """Give up this iteration: theta_0 back into the parameters (alpha_s > 0), the snapshot freed.

        The schedule is untouched, so the next :meth:`SFPO.begin` retries iteration s.
        What theta_0 could not be restored into is added as notes to ``failure``. A no-op
        after :meth:`finish` or a previous ``abort``.
        """
        if self._snap is not None:
            for note in restore_theta0(self._snap, self._params, self._sfpo.config.backend):
                if failure is not None:
                    add_note(failure, note)
        self._release()
        self._finished = True

    def release(self) -> None:
        """Free the snapshot and keep the parameters as they are (a run that stops between passes); no schedule change."""
        self._release()
        self._finished = True

    def _release(self) -> None:
        if self._snap is not None:
            self._snap.release()
            self._snap = None


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
