"""`dinocell eval <task> ...`: dispatch to the evaluation commands, each a module with `main(argv)`."""

from __future__ import annotations

import difflib
import importlib
import sys

# task -> (module, one-line description)
TASKS: dict[str, tuple[str, str]] = {
    "features": ("dinocell.commands.eval_features", "export features (cls, patch mean, storage) to a resumable dir"),
    "knn": ("dinocell.commands.eval_knn", "weighted k-NN: top-1/top-5, balanced accuracy, per class, several k"),
    "linear": ("dinocell.commands.eval_linear", "logistic-regression probe, penalty chosen on validation"),
    "finetune": ("dinocell.commands.eval_finetune", "linear head on a frozen backbone, or full fine-tuning"),
    "channel-consistency": ("dinocell.commands.eval_channel_consistency",
                            "same field from the mean of its stains and from each stain alone"),
    "profile-map": ("dinocell.commands.eval_profile_map", "per-well profiles, replicate-retrieval mAP (JUMP)"),
}


def usage() -> str:
    width = max(map(len, TASKS))
    lines = ["usage: dinocell eval <task> [--help] [args...]", "", "tasks:"]
    lines += [f"  {name:<{width}}  {description}" for name, (_, description) in TASKS.items()]
    lines += ["", "Run `dinocell eval <task> --help` for the options and an example; docs/evaluation.md explains "
              "how to read the numbers."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        close = difflib.get_close_matches(task, TASKS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"dinocell eval: unknown task '{task}'.{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    return int(importlib.import_module(TASKS[task][0]).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
