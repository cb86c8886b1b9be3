"""`dinocell eval finetune`: a linear head on a frozen backbone, or full fine-tuning, keeping the best checkpoint."""

from __future__ import annotations

import argparse
import sys

from dinocell.commands.boundary import command
from dinocell.commands.eval_setup import add_model_options, add_run_options, device_of, load_model
from dinocell.eval.errors import EvalError
from dinocell.eval.report import format_table, percent, write_results

PROG = "dinocell eval finetune"


def build_parser() -> argparse.ArgumentParser:
    from dinocell.eval.finetune import MODES, MONITORS, QUANTIZE, FinetuneSettings

    d = FinetuneSettings()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Supervised training of backbone + linear head on labelled dataset strings: --mode frozen trains the "
            "head only, --mode full trains everything with layer-wise lr decay. AdamW, linear warmup then cosine "
            "decay, early stopping on a validation metric; checkpoints/best and checkpoints/last in OUTPUT_DIR "
            "(written atomically), metrics.jsonl (one line per epoch), finetune.json/.txt (the best checkpoint "
            "scored on --val and --test). Rerunning the same command resumes after the last finished epoch."
        ),
        epilog=(
            "examples:\n"
            "  dinocell eval finetune --config-file output/demo/config.yaml \\\n"
            "      --checkpoint output/demo/eval/final/teacher_checkpoint.pth \\\n"
            "      --train SyntheticCellPainting:split=train:size=400:image_size=96:cell_radius=12:seed=1 \\\n"
            "      --test SyntheticCellPainting:split=test:size=400:image_size=96:cell_radius=12 \\\n"
            "      --mode full --epochs 10 --rotate90 --output-dir output/demo/finetune\n"
            "  dinocell eval finetune --arch vit_small --patch-size 16 --in-chans 3 --image-size 224 \\\n"
            "      --checkpoint dinov3_vits16_pretrain.pth --train HuggingFace:name=ethz/food101:split=train \\\n"
            "      --val HuggingFace:name=ethz/food101:split=validation --mode frozen --output-dir ft/food101"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--train", required=True, metavar="DATASET", help="labelled training set (dataset string)")
    add("--val", metavar="DATASET", help="labelled validation set (default: a random --val-fraction of --train)")
    add("--val-fraction", type=float, default=0.1, metavar="F", help="share of --train held out without --val (0.1)")
    add("--test", metavar="DATASET", help="labelled test set, scored once with the best checkpoint")
    add("--num-classes", type=int, metavar="N", help="number of classes, for datasets that do not list them")
    add("--mode", default=d.mode, choices=MODES, help=f"train the head only or everything (default {d.mode})")
    add("--epochs", type=int, default=d.epochs, metavar="N", help=f"most epochs (default {d.epochs})")
    add("--lr", type=float, default=d.lr, metavar="LR", help=f"peak learning rate (default {d.lr:g})")
    add("--min-lr", type=float, default=d.min_lr, metavar="LR", help=f"final learning rate (default {d.min_lr:g})")
    add("--warmup-epochs", type=int, default=d.warmup_epochs, metavar="N", help=f"default {d.warmup_epochs}")
    add("--weight-decay", type=float, default=d.weight_decay, metavar="WD", help=f"default {d.weight_decay:g}")
    add("--layerwise-decay", type=float, default=d.layerwise_decay, metavar="F",
        help=f"lr factor per block from the top, full mode (default {d.layerwise_decay:g}; 1 = none)")
    add("--monitor", default=d.monitor, choices=MONITORS, help=f"validation metric to keep the best of ({d.monitor})")
    add("--patience", type=int, default=d.patience, metavar="N",
        help=f"stop after N epochs without improvement (default {d.patience}; 0 = never)")
    add("--crop-scale", type=float, nargs=2, default=list(d.crop_scale), metavar=("LOW", "HIGH"),
        help="area share of the random-resized crop (default 0.35 1)")
    add("--rotate90", action="store_true", help="also random vertical flips and 90-degree turns (microscopy)")
    add("--quantize", choices=QUANTIZE, help="frozen mode on CUDA: run the backbone in 8-bit or 4-bit "
        "(bitsandbytes)")
    add_run_options(parser)
    add_model_options(parser)
    return parser


def tables(results: dict) -> str:
    rows = []
    for split in ("val", "test"):
        if split in results:
            m = results[split]
            rows.append([split, m["n"], percent(m["accuracy"]), percent(m.get("top5")),
                         percent(m["balanced_accuracy"]), percent(m["macro_f1"]), m["loss"]])
    head = (f"best epoch {results['best_epoch']} of {results['epochs_run']} run"
            f"{' (stopped early)' if results['stopped_early'] else ''}, by validation {results['monitor']}\n")
    return head + format_table(["split", "n", "accuracy %", "top-5 %", "balanced acc %", "macro-F1 %", "loss"], rows)


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import numpy as np
    from torch.utils.data import Subset

    from dinocell.data import make_dataset
    from dinocell.eval.finetune import FinetuneSettings, finetune

    settings = FinetuneSettings(
        mode=args.mode, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay, layerwise_decay=args.layerwise_decay,
        monitor=args.monitor, patience=args.patience, crop_scale=tuple(args.crop_scale), rotate90=args.rotate90,
        quantize=args.quantize, seed=args.seed,
    )
    device = device_of(args)
    model = load_model(args, device)
    train = make_dataset(args.train)
    classes = getattr(train, "classes", None)
    num_classes = args.num_classes or (len(classes) if classes else None)
    if not num_classes:
        raise EvalError(f"{args.train} does not list its classes; give --num-classes")
    if args.val:
        val = make_dataset(args.val)
    else:
        if not 0 < args.val_fraction < 1:
            raise EvalError(f"--val-fraction {args.val_fraction} must be in (0, 1)")
        order = np.random.default_rng(args.seed).permutation(len(train))
        n_val = max(1, round(args.val_fraction * len(train)))
        train, val = Subset(train, sorted(order[n_val:].tolist())), Subset(train, sorted(order[:n_val].tolist()))
    test = make_dataset(args.test) if args.test else None
    description = {"train": args.train, "val": args.val or f"{args.val_fraction} of train",
                   "model": model.description}
    results = finetune(model.backbone, train, val, model.transform, args.output_dir, num_classes=num_classes,
                       settings=settings, device=device, num_workers=args.num_workers, test_set=test,
                       class_names=classes, description=description)
    results.update(settings=description)
    table = tables(results)
    write_results(args.output_dir, "finetune", results, table)
    print(f"{table}\nresults: {args.output_dir}/finetune.json, finetune.txt; best weights: "
          f"{results['checkpoints']['best']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
