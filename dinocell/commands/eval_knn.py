"""`dinocell eval knn`: weighted k-NN classification (DINO protocol) of frozen features, several k at once."""

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
from dinocell.eval.errors import EvalError
from dinocell.eval.report import write_results

PROG = "dinocell eval knn"
DEFAULT_KS = (10, 20, 100, 200)  # DINO's


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Weighted k-NN (DINO): each --test sample's k most cosine-similar --train samples vote for their "
            "labels with weight exp(similarity / T). Reports top-1, top-5 (more than 5 classes), balanced accuracy, "
            "macro-F1 and per-class accuracy for every k. --train/--test are feature directories written by "
            "`dinocell eval features`, or dataset strings (then the model options say which backbone embeds them)."
        ),
        epilog=(
            "examples:\n"
            "  dinocell eval knn --train feats/train --test feats/test --output-dir results/knn\n"
            "  dinocell eval knn --config-file output/demo/config.yaml \\\n"
            "      --checkpoint output/demo/eval/final/teacher_checkpoint.pth \\\n"
            "      --train SyntheticCellPainting:split=train:size=400:image_size=96:cell_radius=12:seed=1 \\\n"
            "      --test SyntheticCellPainting:split=test:size=400:image_size=96:cell_radius=12 \\\n"
            "      --k 10 20 --output-dir output/demo/knn"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--train", required=True, metavar="DIR|DATASET", help="labelled reference set")
    parser.add_argument("--test", required=True, metavar="DIR|DATASET", help="labelled query set")
    parser.add_argument("--k", type=int, nargs="+", metavar="K",
                        help=f"numbers of neighbours (default: those of {' '.join(map(str, DEFAULT_KS))} that are "
                        "<= the train size)")
    parser.add_argument("--temperature", type=float, default=0.07, metavar="T",
                        help="vote weight exp(sim / T) (default 0.07, DINO; scDINO used 0.1)")
    add_feature_option(parser)
    add_run_options(parser)
    add_model_options(parser)
    return parser


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dinocell.eval.knn import knn_evaluate, knn_table

    kinds = tuple(args.features.split("+"))
    inputs = Inputs(args, kinds)
    train, test = inputs.features(args.train, "train"), inputs.features(args.test, "test")
    (train_x, train_y), (test_x, test_y) = labelled(train, args.features, "--train"), labelled(
        test, args.features, "--test")
    num_classes, names = class_info(train, test)
    ks = args.k or [k for k in DEFAULT_KS if k <= len(train_y)] or [len(train_y)]
    if max(ks) > len(train_y):
        raise EvalError(f"--k {max(ks)} is larger than the {len(train_y)} training samples")
    device = inputs.device
    scores = knn_evaluate(train_x.to(device), train_y, test_x.to(device), test_y, ks=ks,
                          temperature=args.temperature, num_classes=num_classes, class_names=names)
    results = {
        "k": scores, "temperature": args.temperature, "features": args.features, "num_classes": num_classes,
        "n_train": len(train_y), "n_test": len(test_y),
        "bad_samples_skipped": {"train": train.bad_counts()["total"], "test": test.bad_counts()["total"]},
        **inputs.description(),
    }
    table = knn_table(results)
    write_results(args.output_dir, "knn", results, table)
    print(f"k-NN: {len(train_y)} reference / {len(test_y)} query samples, {num_classes} classes, "
          f"T={args.temperature}\n{table}\nresults: {args.output_dir}/knn.json, knn.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
