"""Hand-written run directories for the report tests: a config and metrics with chosen stage times, no training.

Every number a test expects follows from the arguments here by arithmetic the
test states, so the report's tables can be checked against them exactly.
"""

from __future__ import annotations

import json


def write_stage_run(
    root,
    name: str,
    seed: int,
    *,
    sfpo: bool,
    accuracies: list[float],
    steps: int = 4,
    planned: int | None = None,
    gen: float = 0.5,
    other: float = 0.25,
    update: float = 0.25,
    k: int = 3,
    snapshot: float = 0.02,
    reposition: float = 0.03,
) -> str:
    """A GRPO or SFPO run of ``steps`` logged steps (of ``planned``), validated at step 0 and every 2nd step.

    A GRPO step: ``gen + other + update`` seconds (``update`` is its one pass, logged as
    ``timing_s/sfpo_slow``); an SFPO step adds ``k`` fast passes of ``update`` seconds each
    and the snapshot and reposition. ``accuracies[i]`` is the test accuracy at step ``2 i``.
    """
    d = root / name
    d.mkdir()
    planned = steps if planned is None else planned
    (d / "config.yaml").write_text(
        f"trainer:\n  seed: {seed}\n  total_training_steps: {planned}\nactor_rollout_ref:\n  actor:\n    sfpo:\n"
        f"      enable: {str(sfpo).lower()}\n      alpha: 0.8\n      inner_steps: {k}\n"
    )
    rows = [{"training/global_step": 0, "val-core/x/reward/mean@1": accuracies[0]}]
    fast = k * update if sfpo else 0.0
    extra = (snapshot + reposition) if sfpo else 0.0
    step_s = gen + other + update + fast + extra
    for step in range(1, steps + 1):
        row = {
            "training/global_step": step,
            "timing_s/step": step_s,
            "timing_s/gen": gen,
            "timing_s/reward": other,
            "timing_s/sfpo_slow": update,
            "timing_s/sfpo_fast": fast,
            "timing_s/sfpo_snapshot": snapshot if sfpo else 0.0,
            "timing_s/sfpo_reposition": reposition if sfpo else 0.0,
            "train/rollouts_total": 8 * step,
            "train/elapsed_s": step_s * step,
            "sfpo/inner_steps_run": float(k if sfpo else 0),
            "perf/cpu_memory_used_gb": 1.0 + 0.5 * sfpo,
        }
        if step % 2 == 0 and len(accuracies) > step // 2:
            row["val-core/x/reward/mean@1"] = accuracies[step // 2]
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)
