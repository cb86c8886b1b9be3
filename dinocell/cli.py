"""`dinocell <command> ...`: one entry point that dispatches to each tool's own `main(argv)`.

Commands (dinocell/commands/) are imported lazily (dinocell.commands.dispatch). Nothing imports this module.
"""

from __future__ import annotations

import os
import sys

from dinocell import __version__
from dinocell.commands.boundary import DEBUG_ENV
from dinocell.commands.dispatch import Table, dispatch, listing

COMMANDS: Table = {
    "train": ("dinocell.commands.train", "self-supervised training (DINO + iBOT + KoLeo or SimCLR) from a YAML config"),
    "datasets": ("dinocell.commands.datasets", "list registered datasets and the keys their strings accept"),
    "mean-std": ("dinocell.commands.mean_std", "per-channel dataset mean/std JSON (scDINO normalisation step)"),
    "viz": ("dinocell.commands.viz", "attention, PCA and embedding maps of a model; crop montages"),
    "plot-metrics": ("dinocell.commands.plot_metrics", "training curves of a run directory"),
    "submit": ("dinocell.commands.submit", "queue a training run on Slurm (submitit), requeued and resumed"),
    "k8s": ("dinocell.commands.k8s", "Kubernetes manifests (PyTorchJob or indexed Job + Service) for a training run"),
    "eval": ("dinocell.commands.eval", "evaluation: features, knn, linear, finetune, channel-consistency, profile-map"),
    "knn": ("dinocell.commands.eval_knn", "k-NN classification of a checkpoint's features (= dinocell eval knn)"),
}


def _usage() -> str:
    lines = ["usage: dinocell [--version] [--debug] <command> [--help] [args...]", "", "commands:", *listing(COMMANDS)]
    lines += ["", "Run `dinocell <command> --help` for the options of one command. A mistake is reported in one line;",
              f"--debug (before or after the command, or {DEBUG_ENV}=1) shows the full traceback instead.",
              "What the messages mean and what to do: docs/troubleshooting.md."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        print(f"dinocell {__version__}")
        return 0
    if argv and argv[0] == "--debug":  # global form of the commands' --debug
        os.environ[DEBUG_ENV] = "1"
        argv = argv[1:]
    return dispatch("dinocell", COMMANDS, argv, _usage())


if __name__ == "__main__":
    sys.exit(main())
