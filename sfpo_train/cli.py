"""The ``sfpo`` command line."""

from __future__ import annotations

import argparse
import sys

from sfpo_train import compare, demo, report, train_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfpo",
        description=(
            "Slow-Fast Policy Optimization (SFPO) for GRPO-style RL of LLMs: fused kernels for the snapshot, "
            "reposition and loss, the update rule, and per-stage profiling."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo_parser = sub.add_parser(
        "demo",
        help="run SFPO's Stage II (snapshot -> K optimizer steps -> reposition) on a tiny real Qwen2 model "
        "with every backend that can run here, and check it bit for bit against the reference",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.main)
    train_parser = sub.add_parser(
        "train",
        help="train GRPO/SFPO with verl's config keys; with no arguments SFPO on the embedded default task (CPU, minutes)",
        description=train_cli.__doc__,
        epilog=train_cli.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_cli.add_arguments(train_parser)
    train_parser.set_defaults(run=train_cli.main)
    report_parser = sub.add_parser(
        "report",
        help="per-stage time/memory tables and plots of runs, and SFPO vs GRPO headline measures (Markdown + HTML)",
        description=report.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_arguments(report_parser)
    report_parser.set_defaults(run=report.main)
    compare_parser = sub.add_parser(
        "compare",
        help="train GRPO and SFPO on a preset over several seeds (same seeds, same data order), then report",
        description=compare.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_arguments(compare_parser)
    compare_parser.set_defaults(run=compare.main)
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
