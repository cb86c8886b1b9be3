"""`dinocell plot-metrics RUN_DIR`: training curves of a run (losses, schedules, gradient norm, speed, evaluations)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dinocell.commands.boundary import add_debug_option, command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinocell plot-metrics",
        description="Draw a run's training curves over iterations from RUN_DIR/training_metrics.json and "
        "RUN_DIR/eval/metrics.json: the loss terms, learning rate, weight decay, teacher temperature and EMA momentum, "
        "gradient norm, images/s, time per iteration and data wait, and the evaluations of the teacher (k-NN top-1 "
        "of every k, channel-consistency retrieval). Resumed runs are drawn once per iteration (the lines of the "
        "latest attempt win). Works while the run is going.",
        epilog="example: dinocell plot-metrics output/ --out curves.png",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's output directory (train.output_dir)")
    parser.add_argument("--out", type=Path, metavar="PNG", help="output file (default: RUN_DIR/training_curves.png)")
    add_debug_option(parser)
    return parser


@command("dinocell plot-metrics")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dinocell.eval.curves import plot_curves

    path = plot_curves(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
