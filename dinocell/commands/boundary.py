"""The one error boundary of every command: a user's mistake is one line on stderr, a bug keeps its traceback.

Every command's `main(argv)` is decorated with `@command("dinocell <name>")` (so `dinocell <name>`, `python -m
dinocell.train` under torchrun, and a direct call of `main` in Python all behave alike). A `UserError` (and the path
errors of dinocell.errors) prints `dinocell <name>: <message>` on stderr, also into the run's log file when one is
open, and returns its exit code (2 unless the error says otherwise); Ctrl-C prints one line and returns 130. Anything
else propagates with its traceback, because it is a bug. `--debug` on the command line (or DINOCELL_DEBUG=1) lets
every error propagate, traceback included.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence

from dinocell.errors import is_user_error, user_message

DEBUG_ENV = "DINOCELL_DEBUG"
Main = Callable[[Sequence[str] | None], int]


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"on an error, show the full Python traceback instead of one line (also {DEBUG_ENV}=1)")


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report(prog: str, message: str) -> None:
    """`prog: message` on stderr, and into the log file of a run when one is open (a Slurm or cluster log reader
    finds the reason there too)."""
    rank, world = os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1"))
    where = f" [rank {rank}]" if world > 1 else ""
    print(f"{prog}{where}: {message}", file=sys.stderr, flush=True)
    record = logging.makeLogRecord({"name": "dinocell", "levelno": logging.ERROR, "levelname": "ERROR",
                                    "msg": message})
    for handler in logging.getLogger("dinocell").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def command(prog: str) -> Callable[[Main], Main]:
    """Decorator of a command's `main(argv) -> int` that puts it behind the boundary."""

    def decorate(main: Main) -> Main:
        @functools.wraps(main)
        def guarded(argv: Sequence[str] | None = None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = debug_requested(argv)
            try:
                return int(main(argv) or 0)
            except KeyboardInterrupt:
                if debug:
                    raise
                report(prog, "interrupted (Ctrl-C)")
                return 130
            except Exception as error:
                if debug or not is_user_error(error):
                    raise
                report(prog, user_message(error))
                return int(getattr(error, "exit_code", 2))

        return guarded

    return decorate
