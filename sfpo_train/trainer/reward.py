"""Verifiable rewards with verl's ``compute_score(data_source, solution_str, ground_truth, extra_info)``.

The default (:func:`default_reward`) routes by ``data_source``: sfpo's own tasks
first (:data:`sfpo_train.tasks.SCORERS`, the embedded addition task), then verl's
``verl.utils.reward_score.default_compute_score`` when verl is installed (GSM8K's
``openai/gsm8k``, MATH, DAPO's math, ...), so a verl-layout parquet file gets the
scorer verl would give it. :func:`check_data_sources` runs at startup on every
data source of the training and validation files: one that no scorer knows is a
``ValueError`` naming it and ``custom_reward_function`` (and the ``verl`` extra when
verl is missing) before any work. ``custom_reward_function.path`` / ``.name`` load
a user's function from a Python file, as verl does. A function may return a number or a dict with a
``"score"`` entry (verl's convention); anything else (a bool, NaN, an
infinity, an integer too large for a float, a complex number), an exception or
a ``sys.exit()`` is a ``ValueError`` naming the function and the sample.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import math
import numbers
import os
from collections.abc import Callable, Iterable

ScoreFn = Callable[..., object]

CUSTOM_HINT = (
    "give your own with custom_reward_function.path=<file.py> custom_reward_function.name=<function> "
    "(verl's signature: compute_score(data_source, solution_str, ground_truth, extra_info))"
)


def default_reward(data_source: str, solution_str: str, ground_truth, extra_info: dict | None = None):
    """The reward without ``custom_reward_function``: sfpo's scorer for ``data_source``, else verl's.

    verl's ``default_compute_score`` returns a float or a dict with ``"score"`` (verl's
    convention, read by :func:`score_one`). Raises ``ValueError`` naming the data source when
    neither knows it (the startup check, :func:`check_data_sources`, stops a run before that).
    """
    from sfpo_train.tasks import SCORERS

    own = SCORERS.get(data_source)
    if own is not None:
        return own(data_source, solution_str, ground_truth, extra_info)
    verl_score = verl_default_compute_score()
    if verl_score is None:
        raise ValueError(f"no reward function for data_source {data_source!r}: {_missing_hint(False)}")
    return verl_score(data_source, solution_str, ground_truth, extra_info)


@functools.cache
def verl_default_compute_score() -> ScoreFn | None:
    """``verl.utils.reward_score.default_compute_score``, or None without verl (imported once, when first needed)."""
    try:
        from verl.utils.reward_score import default_compute_score
    except ImportError:
        return None
    return default_compute_score


def _missing_hint(verl_installed: bool) -> str:
    ours = ", ".join(sorted(_own_sources()))
    if verl_installed:
        return f"neither sfpo ({ours}) nor verl's default_compute_score scores it; {CUSTOM_HINT}"
    return (
        f"sfpo scores only {ours} without verl: install the verl extra (pip install 'sfpo[verl]') for verl's "
        f"default_compute_score (openai/gsm8k, MATH, ...), or {CUSTOM_HINT}"
    )


def _own_sources() -> list[str]:
    from sfpo_train.tasks import SCORERS

    return list(SCORERS)


def check_data_sources(fn: ScoreFn, sources: dict[str, Iterable[str]]) -> None:
    """``ValueError`` if ``fn`` is :func:`default_reward` and a data source has no scorer (``sources``: key -> sources).

    verl's dispatcher has no list of the sources it knows: it is asked with ``solution_str=None``
    and ``ground_truth=None``, which each of its scorers rejects at once (TypeError, ...) while an
    unknown source raises ``NotImplementedError`` before any scorer runs, so no scorer does real work
    (no code is executed for a code data set). A scorer whose own package is missing (verl's
    ``hiyouga/geometry3k`` needs ``mathruler``) is named now too. A custom function is not asked:
    the user's code decides what it scores.
    """
    if fn is not default_reward:
        return
    own = set(_own_sources())
    verl_score = None
    for key, names in sources.items():
        for source in sorted(set(names) - own):
            verl_score = verl_score or verl_default_compute_score()
            if verl_score is None:
                raise ValueError(f"{key}: data_source {source!r} has no reward function: {_missing_hint(False)}")
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    verl_score(source, None, None, None)  # some of verl's scorers print what they reject
            except NotImplementedError:
                raise ValueError(
                    f"{key}: data_source {source!r} has no reward function: {_missing_hint(True)}"
                ) from None
            except ImportError as e:
                raise ValueError(
                    f"{key}: verl's reward function for data_source {source!r} needs a package that is not "
                    f"installed ({e}); install it, or {CUSTOM_HINT}"
                ) from None
            except Exception:
                pass  # a scorer matched and refused the None answer: it is there


def load_reward_fn(path: str | None, name: str) -> ScoreFn:
    """:func:`default_reward` without ``path``; else the function ``name`` from the Python file ``path``."""
    if path is None:
        return default_reward
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
