"""`dinocell mean-std DATASET`: per-channel dataset mean/std JSON (the scDINO normalisation step)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dinocell.commands.boundary import add_debug_option, command
from dinocell.data import make_dataset
from dinocell.data.mean_std import compute_mean_std
from dinocell.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinocell mean-std",
        description="Per-channel dataset mean/std over a random fraction of the images, written as JSON "
        '{"mean": [...], "std": [...]} for SingleCellFolder:stats=FILE. Give the dataset string without stats= '
        "(the statistics are of the min-max normalised images).",
        epilog="example: dinocell mean-std SingleCellFolder:root=/data/cells:channels=0,1,2,3,4 --out stats.json",
    )
    parser.add_argument("dataset", help="dataset string, e.g. SingleCellFolder:root=/data/cells:channels=0,1,2,3,4")
    parser.add_argument("--fraction", type=float, default=0.2, help="share of images to use (default 0.2)")
    parser.add_argument("--out", type=Path, default=Path("stats.json"), help="output JSON (default stats.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image subset (default 0)")
    parser.add_argument(
        "--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="loader processes (default min(8, CPUs))"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per worker task (default 16)")
    add_debug_option(parser)
    return parser


@command("dinocell mean-std")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dataset = make_dataset(args.dataset)
    if getattr(dataset, "mean", None) is not None:
        raise UsageError(f"'{args.dataset}' already standardises its images (stats=...): give the string without "
                         "stats=")
    stats = compute_mean_std(dataset, args.fraction, args.seed, args.num_workers, args.batch_size)
    stats.update(dataset=args.dataset, fraction=args.fraction, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(stats, indent=2) + "\n")
    skipped = f" ({stats['n_skipped']} bad files skipped)" if stats["n_skipped"] else ""
    print(f"mean {[round(m, 4) for m in stats['mean']]} std {[round(s, 4) for s in stats['std']]} over "
          f"{stats['n_images']} images{skipped} -> {args.out}")
    return 0
