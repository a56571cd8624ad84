"""Write the addition task's verl-layout data: ``train.parquet`` and ``test.parquet``.

Each row is one ``abc+def=`` problem (see ``sfpo_train.tasks.addition.make_rows``).
The test problems come from a held-out pool that no train set touches, in
either operand order, whatever the seed. Rerunning with the same arguments
writes the same rows.

    python scripts/make_addition_data.py                      # the shipped files
    python scripts/make_addition_data.py --out /tmp/add --train-size 1000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sfpo_train.tasks import TASK_ASSETS, addition

DEFAULT_OUT = TASK_ASSETS["addition"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"directory to write train.parquet and test.parquet into, created if missing (default: the "
        f"package's asset directory, {DEFAULT_OUT})",
    )
    parser.add_argument("--train-size", type=int, default=20000, help="number of train problems (default 20000)")
    parser.add_argument("--test-size", type=int, default=500, help="number of test problems (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed that picks the problems of both splits (default 0)")
    return parser


def write_rows(rows: list[dict], path: Path) -> None:
    """One parquet file holding ``rows``; nested fields become parquet lists/structs, as verl reads them."""
    pq.write_table(pa.Table.from_pylist(rows), path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train_size < 1:
        parser.error(f"--train-size must be >= 1, got {args.train_size}")
    if args.test_size < 1:
        parser.error(f"--test-size must be >= 1, got {args.test_size}")
    args.out.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", args.train_size), ("test", args.test_size)):
        path = args.out / f"{split}.parquet"
        write_rows(addition.make_rows(size, args.seed, split), path)
        print(f"wrote {size} {split} rows to {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
