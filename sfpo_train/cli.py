"""The ``sfpo`` command line."""

from __future__ import annotations

import argparse
import sys

from sfpo_train import compare, demo, report, train_cli


# (name, module with add_arguments/main, one-line help, extra add_parser keywords)
SUBCOMMANDS = (
    ("demo", demo, "run SFPO's Stage II (snapshot -> K optimizer steps -> reposition) on a tiny real Qwen2 model "
                   "with every backend that can run here, and check it bit for bit against the reference", dict),
    ("train", train_cli, "train GRPO/SFPO with verl's config keys; with no arguments SFPO on the embedded default "
                         "task (CPU, minutes)", lambda: {"epilog": train_cli.epilog()}),
    ("report", report, "per-stage time/memory tables and plots of runs, and SFPO vs GRPO headline measures "
                       "(Markdown + HTML)", dict),
    ("compare", compare, "train GRPO and SFPO on a preset over several seeds (same seeds, same data order), "
                         "then report", dict),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfpo",
        description=(
            "Slow-Fast Policy Optimization (SFPO) for GRPO-style RL of LLMs: fused kernels for the snapshot, "
            "reposition and loss, the update rule, and per-stage profiling."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text, extra in SUBCOMMANDS:
        command = sub.add_parser(name, help=help_text, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, **extra())  # fmt: skip
        module.add_arguments(command)
        command.set_defaults(run=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except ValueError as e:
        parser.exit(2, f"sfpo {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
