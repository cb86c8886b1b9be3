"""`dinocell datasets [NAME]`: list the registered datasets and the keys their strings accept."""

from __future__ import annotations

import argparse

from dinocell.commands.boundary import add_debug_option, command
from dinocell.data import list_datasets
from dinocell.data.registry import describe_dataset, lookup_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinocell datasets",
        description="List registered datasets and the keys their strings accept. "
        "Dataset string syntax: Name:key=value:key=value (a ':' that is not followed by key= stays in the value).",
        epilog="example: dinocell datasets SyntheticCellPainting",
    )
    parser.add_argument("name", nargs="?", help="show only this dataset")
    add_debug_option(parser)
    return parser


@command("dinocell datasets")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.name:
        print(describe_dataset(args.name, lookup_dataset(args.name)))
        return 0
    print("\n\n".join(describe_dataset(n, c) for n, c in list_datasets().items()))
    return 0
