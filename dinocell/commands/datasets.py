"""`dinocell datasets [NAME]`: list the registered datasets and the keys their strings accept."""

from __future__ import annotations

import argparse
import sys

from dinocell.data import list_datasets
from dinocell.data.registry import DatasetStringError, describe_dataset, lookup_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinocell datasets",
        description="List registered datasets and the keys their strings accept. "
        "Dataset string syntax: Name:key=value:key=value (a ':' that is not followed by key= stays in the value).",
        epilog="example: dinocell datasets SyntheticCellPainting",
    )
    parser.add_argument("name", nargs="?", help="show only this dataset")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.name:
        try:
            cls = lookup_dataset(args.name)
        except DatasetStringError as err:
            print(f"dinocell datasets: {err}", file=sys.stderr)
            return 2
        print(describe_dataset(args.name, cls))
        return 0
    print("\n\n".join(describe_dataset(n, c) for n, c in list_datasets().items()))
    return 0
