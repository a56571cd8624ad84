"""The ``sfpo`` command line: one module per subcommand, imported only when that subcommand runs.

``sfpo --help`` imports none of them (no torch kernels, triton, pandas or
transformers), so it answers at once; ``sfpo <command> ...`` imports
``sfpo_train.cli.<command>`` alone. Each subcommand module has ``add_arguments(parser)``
and ``main(args) -> int``, and may have ``epilog() -> str``; its ``--help`` description
is ``description()`` where it has one, else its docstring.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> one-line help; the subcommand's code is sfpo_train.cli.<name>
SUBCOMMANDS = {
    "demo": "run SFPO's Stage II (snapshot -> K optimizer steps -> reposition) on a tiny real Qwen2 model with every "
    "backend that can run here, and check it bit for bit against the reference",
    "train": "train GRPO/SFPO with verl's config keys; with no arguments SFPO on the embedded default task "
    "(CPU, minutes)",
    "report": "per-stage time/memory tables and plots of runs, and SFPO vs GRPO headline measures (Markdown + HTML)",
    "compare": "train GRPO and SFPO on a preset over several seeds (same seeds, same data order), then report",
    "sweep": "the paper's ablations as one resumable grid (K x alpha, decay, entropy control, stages, lr), then a "
    "table and a heat map",
}


def _command_in(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (its first non-option word), if it is one of ours."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in SUBCOMMANDS else None
    return None


# options people try that are config keys here: option -> the key
CONFIG_KEY_OPTIONS = {
    "--device": "trainer.device",
    "--seed": "trainer.seed",
    "--lr": "actor_rollout_ref.actor.optim.lr",
    "--model": "actor_rollout_ref.model.path",
}


def _config_key_hint(argv: list[str]) -> str | None:
    """The message for an option that is a config key in sfpo (``--device cuda`` -> ``trainer.device=cuda``).

    Only where the command has no such option (``sfpo demo --device`` is one of demo's options).
    """
    if _command_in(argv) not in (None, "train", "compare", "sweep", "report"):
        return None
    for i, word in enumerate(argv):
        option, _, value = word.partition("=")
        if option in CONFIG_KEY_OPTIONS:
            if not value and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                value = argv[i + 1]
            command = _command_in([w for w in argv if w != word and w != value]) or "train"
            return (
                f"{option} is not an option: settings are verl's config keys, e.g. "
                f"sfpo {command} {CONFIG_KEY_OPTIONS[option]}={value or '...'} (sfpo {command} --help lists them)"
            )
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``sfpo`` parser; only ``command``'s module is imported and given its full argument list."""
    parser = argparse.ArgumentParser(
        prog="sfpo",
        description=(
            "Slow-Fast Policy Optimization (SFPO) for GRPO-style RL of LLMs: fused kernels for the snapshot, "
            "reposition and loss, the update rule, and per-stage profiling."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"sfpo_train.cli.{name}")
        epilog = module.epilog() if hasattr(module, "epilog") else None
        parsed = sub.add_parser(
            name,
            help=help_text,
            description=module.description() if hasattr(module, "description") else module.__doc__,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(parsed)
        parsed.set_defaults(run=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    hint = _config_key_hint(argv)
    if hint:
        print(f"sfpo: error: {hint}", file=sys.stderr)
        return 2
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except ValueError as e:
        parser.exit(2, f"sfpo {args.command}: error: {e}\n")
