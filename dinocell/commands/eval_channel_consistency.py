"""`dinocell eval channel-consistency`: one field embedded from the mean of its stains and from each stain alone."""

from __future__ import annotations

import argparse
import sys

from dinocell.commands.boundary import command
from dinocell.commands.eval_setup import add_model_options, add_run_options, device_of, load_model
from dinocell.eval.report import write_results

PROG = "dinocell eval channel-consistency"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Embed every field of a multi-channel dataset under every channel view: the mean of its channels (the "
            "reference), each single channel (replicated to the model's input channels, as in training), and all "
            "channels when the model takes them. Per view: the mean cosine similarity of the cls feature to the "
            "same field's mean view, and the top-1 retrieval of the field among the mean views of all fields "
            "(chance = 1 / fields). A model that describes the biology rather than the stain scores high on both."
        ),
        epilog=(
            "example:\n"
            "  dinocell eval channel-consistency --config-file output/demo/config.yaml \\\n"
            "      --checkpoint output/demo/eval/final/teacher_checkpoint.pth \\\n"
            "      --dataset SyntheticCellPainting:split=test:size=200:image_size=96:cell_radius=12 \\\n"
            "      --output-dir output/demo/channels"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, metavar="DATASET", help="multi-channel dataset string")
    add_run_options(parser, batch_size=32)
    add_model_options(parser)
    return parser


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dinocell.data import make_dataset
    from dinocell.eval.channel_consistency import channel_consistency, consistency_table

    device = device_of(args)
    model = load_model(args, device)
    crops = model.cfg.crops
    results = channel_consistency(
        model.backbone, make_dataset(args.dataset), size=int(crops.global_crops_size),
        in_chans=int(model.cfg.student.in_chans), channel_mean=model.description["channel_mean"],
        channel_std=model.description["channel_std"], batch_size=args.batch_size, num_workers=args.num_workers,
        device=device,
    )
    results.update(dataset=args.dataset, model=model.description)
    table = consistency_table(results)
    write_results(args.output_dir, "channel-consistency", results, table)
    print(f"{table}\nresults: {args.output_dir}/channel-consistency.json, channel-consistency.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
