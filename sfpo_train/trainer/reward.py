"""Verifiable rewards with verl's ``compute_score(data_source, solution_str, ground_truth, extra_info)``.

The default routes by ``data_source`` (:func:`sfpo_train.tasks.compute_score`);
``custom_reward_function.path`` / ``.name`` load a user's function from a
Python file, as verl does. A function may return a number or a dict with a
``"score"`` entry (verl's convention); anything else (a bool, NaN, an
infinity, an integer too large for a float, a complex number), an exception or
a ``sys.exit()`` is a ``ValueError`` naming the function and the sample.
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
    except (Exception, SystemExit) as e:  # a module that calls sys.exit() must not end sfpo train with its code
        raise ValueError(f"custom_reward_function.path={path!r} failed to import: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"custom_reward_function.name={name!r} is not a function in {path!r}")
    return fn


def score_one(
    fn: ScoreFn, index: int, data_source: str, prompt: str, response: str, ground_truth, extra_info
) -> tuple[float, dict[str, float]]:
    """One sample's ``(score, extra)``: the score as a float and a dict reward's other numeric entries.

    Errors name the function and the sample so the user can reproduce them.
    """
    where = (
        f"sample {index} (data_source={data_source!r}, prompt={prompt!r}, response={response!r}, "
        f"function={_describe(fn)})"
    )
    try:
        result = fn(data_source=data_source, solution_str=response, ground_truth=ground_truth, extra_info=extra_info)
    except (Exception, SystemExit) as e:  # sys.exit() in a reward must not end sfpo train with its code
        raise ValueError(f"the reward function raised on {where}: {type(e).__name__}: {e}") from e
    extra: dict[str, float] = {}
    if isinstance(result, dict):
        if "score" not in result:
            raise ValueError(f"the reward function returned a dict without 'score' on {where}")
        # verl's rule rewards report e.g. {"score": 1.0, "acc": True}: booleans count as 0/1 here
        extra = {k: float(v) for k, v in result.items() if k != "score" and (isinstance(v, bool) or _is_number(v))}
        result = result["score"]
    if not _is_number(result):
        raise ValueError(f"the reward function must return a finite number, got {_short_repr(result)} on {where}")
    return float(result), extra


def _is_number(value) -> bool:
    """A real number (not a bool) that is finite as a float: ``10**400`` is not (it overflows)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except (OverflowError, ValueError, TypeError):
        return False


def _describe(fn: ScoreFn) -> str:
    """The reward function as the user knows it: its name and the file it is defined in."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    code = getattr(fn, "__code__", None)
    return f"{name} in {code.co_filename}" if code is not None else name


def _short_repr(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (an integer too large for a float has hundreds of digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception as e:  # a user's object whose __repr__ fails
        return f"a {type(value).__name__} ({type(e).__name__} in its repr)"
    return text if len(text) <= limit else text[: limit - 3] + "..."
