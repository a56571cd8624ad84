"""The GRPO loss's scalar settings, defined once: names, defaults, checks and help.

Every caller of the loss (:func:`sfpo_kernels.grpo_loss`,
:func:`sfpo_kernels.linear_grpo_loss`, the standalone trainer, the verl plugin,
the benchmarks) builds one :class:`GRPOLossOptions` and passes it on. Adding an
option is one field here (default, help, check) plus its math in
:mod:`sfpo_kernels.grpo_math`: every loss entry point takes ``options=`` and the
option's name as a keyword (:func:`resolve_options`), without naming it.

A bad value raises :class:`LossOptionError`, a ``ValueError`` that carries the
option's name (``.option``) and value, so a caller can name its own key for it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

# verl 0.9.1's names (``kl_penalty``, ``agg_loss``); a '+' suffix on a KL type takes the k2 gradient.
KL_TYPES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


class LossOptionError(ValueError):
    """A loss option outside its domain; ``option`` is the field's name, ``value`` what was given."""

    def __init__(self, option: str, value, message: str):
        super().__init__(message)
        self.option, self.value = option, value


def is_finite_real(value) -> bool:
    """A real number (not a bool) that is finite."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


# Each check returns None for a good value, else the error message.
Check = Callable[[str, object], "str | None"]


def _finite(name: str, value) -> str | None:
    return None if is_finite_real(value) else f"{name} must be a finite number, got {value!r}"


def _positive(name: str, value) -> str | None:
    return _finite(name, value) or (None if value > 0 else f"{name} must be > 0, got {value!r}")


def _clip_low(name: str, value) -> str | None:
    return _finite(name, value) or (None if 0.0 <= value < 1.0 else f"{name} must be in [0, 1), got {value!r}")


def _non_negative(name: str, value) -> str | None:
    return _finite(name, value) or (None if value >= 0.0 else f"{name} must be >= 0, got {value!r}")


def _dual_clip(name: str, value) -> str | None:
    if value is None:
        return None
    return _finite(name, value) or (
        None if value > 1.0 else f"{name} must be > 1 (dual clip) or None (off), got {value!r}"
    )


def _kl_type(name: str, value) -> str | None:
    base = value[:-1] if isinstance(value, str) and value.endswith("+") else value
    if base in KL_TYPES:
        return None
    return (
        f"{name}={value!r} is not supported; expected one of {', '.join(KL_TYPES)} (a '+' suffix takes the k2 gradient)"
    )


def _agg_mode(name: str, value) -> str | None:
    if value in AGG_MODES:
        return None
    return f"{name}={value!r} is not supported; expected one of {', '.join(AGG_MODES)}"


def _option(default, check: Check, help: str, choices: tuple[str, ...] = ()):
    return field(default=default, metadata={"check": check, "help": help, "choices": choices})


@dataclass(frozen=True)
class GRPOLossOptions:
    """The scalar settings of the GRPO loss (verl 0.9.1's meaning for each), validated at construction.

    ``loss = agg(pg) - entropy_coef * agg(H) + kl_coef * agg(kl)`` with
    ``pg = max(-A r, -A clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high))``,
    and for ``A < 0`` also ``min(pg, -A clip_ratio_c)`` (dual clip).
    """

    temperature: float = _option(1.0, _positive, "the logits are divided by it before the softmax (> 0)")
    clip_ratio_low: float = _option(0.2, _clip_low, "the ratio's lower clip is 1 - clip_ratio_low ([0, 1))")
    clip_ratio_high: float = _option(
        0.2, _non_negative, "the ratio's upper clip is 1 + clip_ratio_high (>= 0; DAPO's clip-higher: > clip_ratio_low)"
    )
    clip_ratio_c: float | None = _option(
        3.0, _dual_clip, "dual-clip bound for negative advantages (> 1), or None for no dual clip"
    )
    kl_coef: float = _option(0.0, _finite, "weight of the KL penalty to the reference policy (needs ref log-probs)")
    kl_type: str = _option(
        "low_var_kl", _kl_type, "the per-token KL estimator; a '+' suffix takes the k2 gradient", KL_TYPES
    )
    entropy_coef: float = _option(0.0, _finite, "weight of the entropy bonus (subtracted from the loss)")
    loss_agg_mode: str = _option(
        "token-mean", _agg_mode, "how token terms are aggregated into the loss (the seq-* modes need [B, T])", AGG_MODES
    )

    def __post_init__(self):
        for f in fields(self):
            check_option(f.name, getattr(self, f.name))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def help(cls) -> dict[str, str]:
        """``{option: help text}`` (with its choices, where it has a fixed set)."""
        out = {}
        for f in fields(cls):
            choices = f.metadata["choices"]
            out[f.name] = f.metadata["help"] + (f"; one of {', '.join(choices)}" if choices else "")
        return out

    def as_kwargs(self) -> dict:
        """``{option: value}``, the keyword arguments of :func:`sfpo_kernels.grpo_loss`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def option_problem(option: str, value, called: str | None = None) -> str | None:
    """What is wrong with ``value`` for ``option`` (None: nothing), said of ``called`` (default: the option's name).

    A caller that sets the option through a key of its own (the trainer's
    ``actor_rollout_ref.actor.clip_ratio_c``) passes that key as ``called``.
    """
    return _FIELDS[option].metadata["check"](called or option, value)


def check_option(name: str, value) -> None:
    """Raise :class:`LossOptionError` unless ``value`` is good for option ``name`` (e.g. a bare temperature)."""
    message = option_problem(name, value)
    if message is not None:
        raise LossOptionError(name, value, message)


def resolve_options(options: GRPOLossOptions | None, overrides: dict, caller: str) -> GRPOLossOptions:
    """``options`` (default: :data:`DEFAULT_LOSS_OPTIONS`) with ``overrides`` (option keywords) replaced.

    What every loss entry point does with its ``options=None, **option_overrides``:
    ``grpo_loss(..., clip_ratio_high=0.28)`` and
    ``grpo_loss(..., options=GRPOLossOptions(clip_ratio_high=0.28))`` are the same
    call, and an override on top of ``options`` replaces that field. A keyword that
    is no option raises ``TypeError`` as Python does for ``caller``'s signature; a
    bad value raises :class:`LossOptionError`.
    """
    unknown = [name for name in overrides if name not in _NAMES]
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    if options is None:
        options = DEFAULT_LOSS_OPTIONS
    elif not isinstance(options, GRPOLossOptions):
        raise TypeError(f"{caller}() options must be a GRPOLossOptions or None, got {type(options).__name__}")
    return replace(options, **overrides) if overrides else options


_FIELDS = {f.name: f for f in fields(GRPOLossOptions)}
_NAMES = frozenset(_FIELDS)

DEFAULT_LOSS_OPTIONS = GRPOLossOptions()
