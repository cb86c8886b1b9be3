"""`dinocell train --config-file F --output-dir D [--no-resume] [--print-config] key=value ...` (also
`python -m dinocell.train`, which torchrun and launch_ssl.sh start)."""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from dinocell import distributed
from dinocell.commands.boundary import add_debug_option, command
from dinocell.commands.common import load_checked_config
from dinocell.config import config_to_yaml
from dinocell.errors import UserError
from dinocell.train.checkpoint import list_checkpoints
from dinocell.train.signals import Terminated, sigterm_stops_run
from dinocell.train.train import train

LAUNCH_ENV = "DINOCELL_LAUNCH_COMMAND"  # set by launch_ssl.sh: the command that resumes the run, as the user ran it


class RunStopped(UserError):
    """Ctrl-C or SIGTERM ended the run; the message names the checkpoint a rerun resumes from and the command."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinocell train",
        description="Self-supervised training: DINO + iBOT + KoLeo (method=dino, the default) or SimCLR "
        "(method=simclr). Re-running the same command resumes from the newest complete checkpoint in "
        "OUTPUT_DIR/ckpt/. One 'epoch' = train.OFFICIAL_EPOCH_LENGTH iterations. key=value overrides may stand "
        "anywhere on the line.",
        epilog="examples: dinocell train --config-file configs/train/demo.yaml --output-dir output/demo "
        "optim.epochs=10;  dinocell train --config-file configs/train/simclr_resnet18_demo.yaml",
    )
    parser.add_argument("--config-file", default=None,
                        help="YAML recipe (a path, or an s3:// or https:// URL) merged over the default config")
    parser.add_argument("--output-dir", default=None, help="run directory (overrides train.output_dir)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from scratch: an earlier run's files in the output directory are moved into "
                        "OUTPUT_DIR/replaced-<time>/")
    parser.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    add_debug_option(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.batch_size_per_gpu=32")
    return parser


def resume_command(argv: Sequence[str]) -> str:
    """The command that continues this run: the launcher's when one said so, else `dinocell train` with the same
    arguments minus --no-resume (which would start over)."""
    if os.environ.get(LAUNCH_ENV):
        return os.environ[LAUNCH_ENV]
    again = shlex.join(["dinocell", "train", *(a for a in argv if a != "--no-resume")])
    return again + (" under the same launcher (torchrun, srun)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")


def stopped(reason: str, out: Path, argv: Sequence[str]) -> str:
    checkpoints = list_checkpoints(out / "ckpt")
    newest = (f"the newest checkpoint is {checkpoints[-1]} (iteration {checkpoints[-1].name})" if checkpoints
              else "there is no checkpoint yet (a rerun starts from iteration 0)")
    return f"{reason}; {newest}. Resume with: {resume_command(argv)}"


@command("dinocell train")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_checked_config(args.config_file, overrides)
    if args.print_config:
        print(config_to_yaml(cfg))
        return 0
    out = Path(cfg.train.output_dir)
    try:
        with distributed.process_group_ends(), sigterm_stops_run(cfg.checkpointing.save_on_sigterm) as stop:
            train(cfg, resume=not args.no_resume, stop=stop)
    except KeyboardInterrupt as interrupt:
        raise RunStopped(stopped("interrupted (Ctrl-C)", out, argv), 130) from interrupt
    except Terminated as terminated:
        raise RunStopped(stopped(f"stopped by {terminated}", out, argv), 143) from terminated
    return 0
