"""`dinocell eval <task> ...`: dispatch to the evaluation commands, each a module with `main(argv)`."""

from __future__ import annotations

import sys

from dinocell.commands.dispatch import Table, dispatch, listing

TASKS: Table = {
    "features": ("dinocell.commands.eval_features", "export features (cls, patch mean, storage) to a resumable dir"),
    "knn": ("dinocell.commands.eval_knn", "weighted k-NN: top-1/top-5, balanced accuracy, per class, several k"),
    "linear": ("dinocell.commands.eval_linear", "logistic-regression probe, penalty chosen on validation"),
    "finetune": ("dinocell.commands.eval_finetune", "linear head on a frozen backbone, or full fine-tuning"),
    "channel-consistency": ("dinocell.commands.eval_channel_consistency",
                            "same field from the mean of its stains and from each stain alone"),
    "profile-map": ("dinocell.commands.eval_profile_map", "per-well profiles, replicate-retrieval mAP (JUMP)"),
}


def usage() -> str:
    lines = ["usage: dinocell eval <task> [--help] [args...]", "", "tasks:", *listing(TASKS)]
    lines += ["", "Run `dinocell eval <task> --help` for the options and an example; docs/evaluation.md explains "
              "how to read the numbers."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return dispatch("dinocell eval", TASKS, list(sys.argv[1:] if argv is None else argv), usage(), noun="task")


if __name__ == "__main__":
    sys.exit(main())
