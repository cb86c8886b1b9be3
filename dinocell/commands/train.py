"""`dinocell train --config-file F --output-dir D [--no-resume] [--print-config] key=value ...` (also
`python -m dinocell.train`)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from dinocell import distributed
from dinocell.commands.common import load_checked_config
from dinocell.config import config_to_yaml
from dinocell.train.train import NonFiniteLossError, train

logger = logging.getLogger("dinocell")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinocell train",
        description="Self-supervised DINO + iBOT + KoLeo training. Re-running the same command resumes from the "
        "newest complete checkpoint in OUTPUT_DIR/ckpt/. One 'epoch' = train.OFFICIAL_EPOCH_LENGTH iterations.",
        epilog="example: dinocell train --config-file configs/train/demo.yaml --output-dir output/demo "
        "optim.epochs=10",
    )
    parser.add_argument("--config-file", default=None,
                        help="YAML recipe (a path, or an s3:// or https:// URL) merged over the default config")
    parser.add_argument("--output-dir", default=None, help="run directory (overrides train.output_dir)")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    parser.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.batch_size_per_gpu=32")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_checked_config(args.config_file, overrides)
    if args.print_config:
        print(config_to_yaml(cfg))
        return 0
    try:
        train(cfg, resume=not args.no_resume)
    except NonFiniteLossError as err:
        logger.error("%s", err)
        return 1
    finally:
        distributed.destroy()
    return 0
