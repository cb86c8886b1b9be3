"""`dinocell eval features`: export a backbone's features of a dataset to a chunked, resumable directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dinocell.commands.boundary import command
from dinocell.commands.eval_setup import add_model_options, add_run_options, load_model
from dinocell.eval.errors import EvalError
from dinocell.eval.report import format_table

PROG = "dinocell eval features"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Embed every sample of a dataset with a backbone and write the features, with sample ids, labels and "
            "metadata (JUMP: source, batch, plate, well, site), to OUTPUT_DIR as numbered chunks plus features.json. "
            "The cls token is always written; --patch-mean and --storage-tokens add the mean patch token and the "
            "storage tokens. Rerunning the same command resumes: finished chunks are kept. Substitutes of bad "
            "files are skipped and counted. Under torchrun every process extracts its share of the chunks."
        ),
        epilog=(
            "examples:\n"
            "  dinocell eval features --config-file output/demo/config.yaml \\\n"
            "      --checkpoint output/demo/eval/final/teacher_checkpoint.pth \\\n"
            "      --dataset SyntheticCellPainting:split=test:size=400:image_size=96:cell_radius=12 \\\n"
            "      --output-dir output/demo/features/test --patch-mean\n"
            "  torchrun --nproc_per_node 8 -m dinocell.commands.eval_features --config-file run/config.yaml \\\n"
            "      --checkpoint run/eval/final/teacher_checkpoint.pth --dataset 'JUMPS3MultiView:...' "
            "--output-dir feats/jump"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, metavar="DATASET", help="dataset string (dinocell datasets)")
    parser.add_argument("--patch-mean", action="store_true", help="also write the mean of the patch tokens")
    parser.add_argument("--storage-tokens", action="store_true", help="also write the storage (register) tokens")
    parser.add_argument("--chunk-size", type=int, default=4096, metavar="N",
                        help="samples per chunk file, the unit of resumption (default 4096)")
    add_run_options(parser)
    add_model_options(parser)
    return parser


def summary_table(manifest: dict) -> str:
    bad = manifest["bad_samples"]
    rows = [["samples in the dataset", manifest["settings"]["n_samples"]], ["rows written", manifest["rows"]],
            ["bad samples skipped", bad["total"]]]
    rows += [[f"  {reason}", count] for reason, count in bad.items() if reason != "total" and count]
    rows += [[f"feature {kind}", " x ".join(map(str, dims))] for kind, dims in manifest["dims"].items()]
    rows += [["chunks", manifest["n_chunks"]]]
    return format_table(["", "value"], rows)


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dinocell import distributed
    from dinocell.data import make_dataset
    from dinocell.eval.features import export_features

    info = distributed.init_distributed()
    device = info.device if args.device is None else torch.device(args.device)
    with distributed.process_group_ends():
        model = load_model(args, device, verbose=info.is_main)
        if args.storage_tokens and model.backbone.n_storage_tokens == 0:
            raise EvalError("--storage-tokens, but the backbone has no storage tokens (n_storage_tokens=0)")
        kinds = ("cls", *(["patch_mean"] if args.patch_mean else []), *(["storage"] if args.storage_tokens else []))
        dataset = make_dataset(args.dataset)
        manifest = export_features(
            model.backbone, dataset, model.transform, args.output_dir,
            settings={"dataset": args.dataset, **model.description}, kinds=kinds, chunk_size=args.chunk_size,
            batch_size=args.batch_size, num_workers=args.num_workers, device=device,
        )
    if info.is_main:
        table = summary_table(manifest)
        (Path(args.output_dir) / "features.txt").write_text(table + "\n")
        print(table)
        print(f"features: {Path(args.output_dir) / 'features.json'} (manifest) and chunk_*.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
