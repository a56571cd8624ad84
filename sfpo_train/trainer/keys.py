"""How a key of the trainer's configuration is declared: once, with its help, allowed values, bounds and resumability.

Each field of the config tree (:mod:`sfpo_train.trainer.schema`) is made with
:func:`key`, which records in the field's metadata everything the trainer needs
to know about it::

    lr: float = key(3e-5, "AdamW learning rate", non_negative(), resumable=False)

:func:`key_table` walks the tree and returns one :class:`Key` per dotted name.
Validation (:func:`check_key`), ``sfpo train --help`` (``KEY_HELP``), the keys a
resumed run may change (``RESUMABLE_KEYS``) and the key an error names are all
read from that table.

A float key must be finite unless it is declared ``finite=False`` (where inf has
a meaning, e.g. no gradient clipping). A key that sets a field of
:class:`sfpo_kernels.loss_options.GRPOLossOptions` names it with ``loss_option=``:
its help text and its checks are the loss option's own.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sfpo_kernels.loss_options import DEFAULT_LOSS_OPTIONS, GRPOLossOptions, is_finite_real

META = "sfpo_key"  # the field-metadata entry holding a key's declaration


@dataclass(frozen=True)
class Rule:
    """A condition a key's value must meet: ``test(value)``, and ``expect``, what the error says it must be."""

    test: Callable[[Any], bool]
    expect: str
    choices: tuple | None = None  # the allowed values, for the help text


def at_least(low: int) -> Rule:
    return Rule(lambda v: v >= low, f">= {low}")


def positive() -> Rule:
    return Rule(lambda v: v > 0, "> 0")


def non_negative() -> Rule:
    return Rule(lambda v: v >= 0, ">= 0")


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Rule:
    """``low <= v <= high``, each end open where asked; the error says e.g. ``in (0, 1]``."""

    def test(v) -> bool:
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return Rule(test, f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")


def one_of(*choices, expect: str | None = None, nullable: bool = False) -> Rule:
    """The value is one of ``choices`` (or null, when ``nullable``)."""
    listed = f"one of {', '.join(map(str, choices))}"
    expect = expect or (f"null or {listed}" if nullable else listed)
    shown = (*choices, None) if nullable else choices  # the help lists null among the choices
    return Rule(lambda v: (nullable and v is None) or v in choices, expect, shown)


def nullable(rule: Rule) -> Rule:
    """``rule``, or null."""
    return Rule(lambda v: v is None or rule.test(v), f"null or {rule.expect}", rule.choices)


class Key(typing.NamedTuple):
    """One key of the config: its dotted name and declaration."""

    name: str
    type: Any  # the resolved annotation
    default: Any
    help: str  # what ``sfpo train --help`` prints
    rules: tuple[Rule, ...]
    finite: bool  # a number must be finite (numeric keys only)
    resumable: bool  # a resumed run may change it (``--resume`` overrides)
    loss_option: str | None  # the GRPOLossOptions field it sets

    @property
    def numeric(self) -> bool:
        return _numeric_type(self.type)


def key(
    default,
    help: str = "",
    *rules: Rule,
    finite: bool = True,
    resumable: bool = False,
    loss_option: str | None = None,
):
    """A config field declaring its key: default, help, rules, and whether a resume may change it.

    ``loss_option`` names the :class:`GRPOLossOptions` field the key sets: the
    option's help follows ``help`` (which may then be empty) and the option's
    own checks apply when the loss options are built.
    """
    if loss_option is not None and loss_option not in GRPOLossOptions.names():
        raise ValueError(f"loss_option must be one of {', '.join(GRPOLossOptions.names())}, got {loss_option!r}")
    if loss_option is not None:
        # the option's own help first, in the command line's words (null, not Python's None)
        option_help = GRPOLossOptions.help()[loss_option].replace("None", "null")
        help = f"{option_help}; {help}" if help else option_help
    else:
        choices = next((r.choices for r in rules if r.choices is not None), None)
        if choices is not None:
            help = f"{help}; one of {', '.join(map(shown_value, choices))}"
    declaration = {"help": help, "rules": rules, "finite": finite, "resumable": resumable, "loss_option": loss_option}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={META: declaration})
    return field(default=default, metadata={META: declaration})


_OPTION_DEFAULT = object()


def loss_key(option: str, help: str = "", *rules: Rule, default=_OPTION_DEFAULT, **kwargs):
    """A key that sets loss option ``option``: :func:`key` with the option's default unless ``default`` differs."""
    if default is _OPTION_DEFAULT:
        default = getattr(DEFAULT_LOSS_OPTIONS, option)
    return key(default, help, *rules, loss_option=option, **kwargs)


def shown_value(value) -> str:
    """A value as the command line writes it (null, true, false, [0.9,0.999])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):  # as the command line writes it: [console,tensorboard], not ['console', ...]
        return "[" + ",".join(map(shown_value, value)) + "]"
    if isinstance(value, dict):
        return str(value).replace(" ", "")
    return str(value)


def _numeric_type(tp) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_args(tp) else [tp]
    return all(isinstance(a, type) and issubclass(a, (int, float)) and a is not bool for a in args)


def key_table(root: type) -> dict[str, Key]:
    """``{dotted name: Key}`` for every leaf field of the dataclass tree ``root``, in declaration order."""
    out: dict[str, Key] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            name = prefix + f.name
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
                walk(type(f.default_factory()), name + ".")
                continue
            if META not in f.metadata:
                raise TypeError(f"{name} is not declared with key(): its help and rules are unknown")
            d = f.metadata[META]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[name] = Key(
                name,
                hints[f.name],
                default,
                d["help"],
                d["rules"],
                d["finite"],
                d["resumable"],
                d["loss_option"],
            )

    walk(root, "")
    return out


def check_key(k: Key, value) -> str | None:
    """The error for ``value`` of key ``k`` (``"<key> must be <what>, got <value>"``), or None when it is good."""
    if value is None and k.default is None and not k.rules:
        return None
    if k.numeric and value is not None and k.finite and not is_finite_real(value):
        return f"{k.name} must be a finite number, got {value!r}"
    for rule in k.rules:
        try:
            good = rule.test(value)
        except (TypeError, ValueError):  # a value of another type than the rule reads (a string in a list)
            good = False
        if not good:
            return f"{k.name} must be {rule.expect}, got {value!r}"
    return None
