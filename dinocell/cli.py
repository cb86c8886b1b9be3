"""`dinocell <command> ...`: one entry point that dispatches to each tool's own `main(argv)`.

Commands (dinocell/commands/) are imported lazily so that `dinocell --help` is instant and one tool's optional
dependencies never break another. Nothing imports this module.
"""

from __future__ import annotations

import importlib
import os
import sys

from dinocell import __version__
from dinocell.commands.boundary import DEBUG_ENV

# command -> (module with a `main(argv: list[str] | None) -> int | None`, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
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
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: dinocell [--version] [--debug] <command> [--help] [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
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
    if not argv:
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"dinocell: unknown command '{command}'.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
