"""Verifiable rewards with verl's ``compute_score(data_source, solution_str, ground_truth, extra_info)``.

The default routes by ``data_source`` (:func:`sfpo_train.tasks.compute_score`);
``custom_reward_function.path`` / ``.name`` load a user's function from a
Python file, as verl does. A function may return a number or a dict with a
``"score"`` entry (verl's convention); anything else, or an exception, is a
``ValueError`` naming the sample.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
from collections.abc import Callable

ScoreFn = Callable[..., object]


def load_reward_fn(path: str | None, name: str) -> ScoreFn:
    if path is None:
        from sfpo_train.tasks import compute_score

        return compute_score
    if not os.path.isfile(path):
        raise ValueError(f"custom_reward_function.path must be an existing .py file, got {path!r}")
    spec = importlib.util.spec_from_file_location("sfpo_custom_reward", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"custom_reward_function.path={path!r} failed to import: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"custom_reward_function.name={name!r} is not a function in {path!r}")
    return fn


def score_one(
    fn: ScoreFn, index: int, data_source: str, prompt: str, response: str, ground_truth, extra_info
) -> tuple[float, dict[str, float]]:
    """One sample's ``(score, extra)``: the score as a float and a dict reward's other numeric entries.

    Errors name the sample so the user can reproduce them.
    """
    where = f"sample {index} (data_source={data_source!r}, prompt={prompt!r}, response={response!r})"
    try:
        result = fn(data_source=data_source, solution_str=response, ground_truth=ground_truth, extra_info=extra_info)
    except Exception as e:
        raise ValueError(f"the reward function raised on {where}: {type(e).__name__}: {e}") from e
    extra: dict[str, float] = {}
    if isinstance(result, dict):
        if "score" not in result:
            raise ValueError(f"the reward function returned a dict without 'score' on {where}")
        # verl's rule rewards report e.g. {"score": 1.0, "acc": True}: booleans count as 0/1 here
        extra = {k: float(v) for k, v in result.items() if k != "score" and (isinstance(v, bool) or _is_number(v))}
        result = result["score"]
    if not _is_number(result):
        raise ValueError(f"the reward function must return a finite number, got {result!r} on {where}")
    return float(result), extra


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))
