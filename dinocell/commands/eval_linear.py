"""`dinocell eval linear`: a logistic-regression probe on frozen features, its L2 penalty chosen on validation."""

from __future__ import annotations

import argparse
import sys

from dinocell.commands.boundary import command
from dinocell.commands.eval_setup import (
    Inputs,
    add_feature_option,
    add_model_options,
    add_run_options,
    class_info,
    labelled,
)
from dinocell.eval.report import format_table, percent, write_results

PROG = "dinocell eval linear"


def build_parser() -> argparse.ArgumentParser:
    from dinocell.eval.linear import DEFAULT_WEIGHT_DECAYS, SELECT_METRICS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Linear probe: multinomial logistic regression on standardised frozen features. Each --weight-decays "
            "value is fitted on the train rows and scored on --val (or on a stratified --val-fraction of --train); "
            "the best is refitted on train + validation and scored on --test: accuracy, balanced accuracy, "
            "macro-F1, top-5 (more than 5 classes), per-class accuracy. Inputs are feature directories from "
            "`dinocell eval features` or dataset strings (then the model options say which backbone embeds them)."
        ),
        epilog=(
            "examples:\n"
            "  dinocell eval linear --train feats/train --test feats/test --output-dir results/linear\n"
            "  dinocell eval linear --train feats/train --val feats/val --test feats/test \\\n"
            "      --features cls+patch_mean --select-by balanced_accuracy --output-dir results/linear"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--train", required=True, metavar="DIR|DATASET", help="labelled training set")
    parser.add_argument("--test", required=True, metavar="DIR|DATASET", help="labelled test set")
    parser.add_argument("--val", metavar="DIR|DATASET", help="labelled validation set (default: split off --train)")
    parser.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                        help="share of each class of --train held out for validation when --val is not given (0.2)")
    parser.add_argument("--weight-decays", type=float, nargs="+", default=list(DEFAULT_WEIGHT_DECAYS), metavar="WD",
                        help="L2 penalties tried (default 1e-6 ... 1, one per decade)")
    parser.add_argument("--select-by", default="accuracy", choices=SELECT_METRICS,
                        help="validation metric that picks the penalty (default accuracy)")
    add_feature_option(parser)
    add_run_options(parser)
    add_model_options(parser)
    return parser


def tables(results: dict) -> str:
    test = results["test"]
    rows = [["accuracy", percent(test["accuracy"])], ["top-5", percent(test.get("top5"))],
            ["balanced accuracy", percent(test["balanced_accuracy"])], ["macro-F1", percent(test["macro_f1"])]]
    text = f"test ({results['n_test']} samples), weight decay {results['weight_decay']:g}\n"
    text += format_table(["metric", "%"], rows)
    selection = [[v["weight_decay"], *(percent(v[m]) for m in ("accuracy", "balanced_accuracy", "macro_f1"))]
                 for v in results["validation"]]
    text += (f"\n\nvalidation ({results['n_val']} samples; fit on {results['n_train']}), chosen by "
             f"{results['select_by']}\n")
    text += format_table(["weight decay", "accuracy %", "balanced acc %", "macro-F1 %"], selection)
    per_class = [[c, percent(a)] for c, a in test["per_class_accuracy"].items()]
    return text + "\n\nper-class test accuracy (recall)\n" + format_table(["class", "%"], per_class)


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dinocell.eval.linear import linear_probe

    inputs = Inputs(args, tuple(args.features.split("+")))
    sets = {name: inputs.features(location, name)
            for name, location in (("train", args.train), ("val", args.val), ("test", args.test)) if location}
    data = {name: labelled(features, args.features, f"--{name}") for name, features in sets.items()}
    num_classes, names = class_info(*sets.values())
    device = inputs.device
    on_device = {name: (x.to(device), y.to(device)) for name, (x, y) in data.items()}
    results = linear_probe(on_device["train"], on_device["test"], val=on_device.get("val"),
                           num_classes=num_classes, val_fraction=args.val_fraction,
                           weight_decays=args.weight_decays, select_by=args.select_by, class_names=names,
                           seed=args.seed)
    results.update(features=args.features, num_classes=num_classes,
                   bad_samples_skipped={n: s.bad_counts()["total"] for n, s in sets.items()},
                   **inputs.description())
    table = tables(results)
    write_results(args.output_dir, "linear", results, table)
    print(f"{table}\nresults: {args.output_dir}/linear.json, linear.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
