"""`dinocell viz attention|pca|embedding|montage`: pictures of what a model learned and of what it is fed.

The model options and the model loading are those of `dinocell eval` (dinocell.commands.eval_setup): the config
(default YAML <- --config-file <- --arch, --patch-size, --in-chans, --n-storage-tokens, --image-size) and the weights
of --checkpoint (anything dinocell.models.load_pretrained accepts). Images come from a dataset string (--dataset) or
from files (--images, TIFF/PNG/JPEG/NPZ), seen through the eval view of the config (centre crop of
crops.global_crops_size, channel rule, crops.channel_mean/std). `montage` needs no model but the crop settings:
--config-file + KEY=VALUE overrides, as for `dinocell train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from dinocell.commands.boundary import add_debug_option, command
from dinocell.commands.eval_setup import add_model_options, device_of, load_model
from dinocell.errors import UsageError
from dinocell.eval.errors import EvalError

EXAMPLE_MODEL = "--config-file run/config.yaml --checkpoint run/eval/final/teacher_checkpoint.pth"
EXAMPLES = {
    "attention": f"dinocell viz attention {EXAMPLE_MODEL} --dataset SyntheticCellPainting:split=test --num-images 4 "
    "--masks --out attention/",
    "pca": f"dinocell viz pca {EXAMPLE_MODEL} --image-size 96 --images cell1.tif cell2.tif --foreground-threshold 0.5 "
    "--out pca/",
    "embedding": f"dinocell viz embedding {EXAMPLE_MODEL} --dataset SyntheticCellPainting:split=test:size=400 "
    "--color-by label --out embedding/",
    "montage": "dinocell viz montage --config-file configs/train/demo.yaml --dataset SyntheticCellPainting "
    "--num-images 3 --out montage.png crops.local_crops_number=4",
}


def _add_model(parser: argparse.ArgumentParser) -> None:
    """The model options of `dinocell eval` (--checkpoint, --config-file, --arch, ...), plus the device."""
    add_model_options(parser)
    parser.add_argument("--device", metavar="DEV", help="torch device (default: cuda if available, else cpu)")
    add_debug_option(parser)


def _add_images(parser: argparse.ArgumentParser, default_count: int) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", metavar="DATASET", help="dataset string, e.g. SyntheticCellPainting:split=test")
    source.add_argument("--images", nargs="+", type=Path, metavar="FILE", help="image files (TIFF, PNG, JPEG, NPZ)")
    parser.add_argument("--num-images", type=int, default=default_count, metavar="N",
                        help=f"use the first N samples (default: {default_count})")
    parser.add_argument("--indices", type=int, nargs="+", metavar="I", help="use these sample indices instead")
    parser.add_argument("--channel-names", metavar="NAMES",
                        help="stain of each channel for the colour composite, comma-separated, from DNA, ER, RNA, "
                        "AGP, Mito (default for 5 channels: DNA,ER,RNA,AGP,Mito)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinocell viz",
        description="Pictures of a model and its inputs: attention maps, PCA feature maps, 2-D embedding maps of "
        "the cls features, and montages of the training crops. See docs/visualisation.md.",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="figure", required=True, metavar="{attention,pca,embedding,montage}")

    def sub(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=summary, epilog=f"example: {EXAMPLES[name]}")

    attention = sub("attention", "last-block cls-to-patch attention per head, overlaid on each image: <id>.png "
                    "(image + mean over heads), <id>_heads.png, <id>_heads.gif, and with --masks <id>_masks.png")
    _add_model(attention)
    _add_images(attention, 4)
    attention.add_argument("--masks", type=float, nargs="?", const=0.6, metavar="SHARE",
                           help="also draw DINO's masks: the patches that hold SHARE of a head's attention "
                           "(default when given without a value: 0.6)")
    attention.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")

    pca = sub("pca", "first three PCA components of the patch tokens as RGB, fitted over all images given: "
              "<id>_pca.png per image and pca_grid.png")
    _add_model(pca)
    _add_images(pca, 8)
    pca.add_argument("--foreground-threshold", type=float, metavar="T",
                     help="keep patches whose first component (scaled to [0, 1]) is above T, refit on them, "
                     "background black (DINOv2's picture; try 0.5)")
    pca.add_argument("--invert-foreground", action="store_true",
                     help="foreground is below the threshold instead (the sign of a component is arbitrary)")
    pca.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")

    embedding = sub("embedding", "UMAP or PCA map of the L2-normalised cls features, coloured by the label or a "
                    "metadata column: embedding_<method>.png and embedding_<method>.csv (id, x, y, colour)")
    _add_model(embedding)
    source = embedding.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", metavar="DATASET", help="dataset string (all its samples are mapped)")
    source.add_argument("--images", nargs="+", type=Path, metavar="FILE", help="image files (TIFF, PNG, JPEG, NPZ)")
    embedding.add_argument("--max-samples", type=int, metavar="N",
                           help="map N samples evenly spaced over the dataset instead of all (for large datasets)")
    embedding.add_argument("--method", choices=("umap", "pca"), default="umap",
                           help="umap (needs umap-learn) or pca (default: umap)")
    embedding.add_argument("--color-by", default="label", metavar="COLUMN",
                           help="'label' (class names) or a metadata column of the samples, e.g. plate, well, "
                           "source (default: label)")
    embedding.add_argument("--n-neighbors", type=int, default=30, help="UMAP neighbours (default: 30, as scDINO)")
    embedding.add_argument("--min-dist", type=float, default=0.4, help="UMAP min_dist (default: 0.4, as scDINO)")
    embedding.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass")
    embedding.add_argument("--num-workers", type=int, default=0, metavar="N", help="data-loading worker processes")
    embedding.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")

    montage = sub("montage", "what the model sees: per sample the field, its channels, and the global and local "
                  "crops of the training transform of the config, in one PNG")
    montage.add_argument("--config-file", metavar="YAML",
                         help="a recipe or a run's config.yaml: the crop settings (sizes, scales, channel views, "
                         "augmentations, normalisation)")
    montage.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="config overrides, e.g. crops.local_crops_number=4 crops.global_crops_size=96")
    _add_images(montage, 4)
    montage.add_argument("--out", type=Path, required=True, metavar="PNG", help="output PNG file")
    add_debug_option(montage)
    return parser


def _dataset(args: argparse.Namespace) -> Any:
    if args.images:
        overrides = [str(p) for p in args.images if "=" in p.name and not p.exists()]
        if overrides and args.figure == "montage":
            raise UsageError(f"--images got {overrides}, which look like config overrides: put KEY=VALUE overrides "
                             "before --images (which takes every value after it)")
        from dinocell.eval.image_files import ImageFiles

        return ImageFiles(args.images)
    from dinocell.data import make_dataset

    return make_dataset(args.dataset)


def _indices(args: argparse.Namespace, size: int) -> list[int]:
    if args.indices:
        bad = [i for i in args.indices if not 0 <= i < size]
        if bad:
            raise UsageError(f"--indices {bad} out of range: the images have {size} samples (0..{size - 1})")
        return list(args.indices)
    if args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    return list(range(min(args.num_images, size)))


def _names(args: argparse.Namespace) -> list[str] | None:
    return args.channel_names.split(",") if args.channel_names else None


def _model_and_views(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, device, views of the chosen samples) for attention and PCA."""
    from dinocell.eval.model_pictures import sample_views

    device = device_of(args)
    model = load_model(args, device)
    dataset = _dataset(args)
    views = sample_views([dataset[i] for i in _indices(args, len(dataset))], model.transform, _names(args))
    return model, device, views


def _attention(args: argparse.Namespace) -> list[Path]:
    from dinocell.eval.model_pictures import attention_pictures, write_attention_pictures

    model, device, views = _model_and_views(args)
    figures = attention_pictures(model.backbone, views, device, mass_share=args.masks)
    return write_attention_pictures(figures, views, args.out)


def _pca(args: argparse.Namespace) -> list[Path]:
    from dinocell.eval.model_pictures import pca_pictures
    from dinocell.eval.pca_maps import write_pca

    model, device, views = _model_and_views(args)
    pairs, grid = pca_pictures(model.backbone, views, device, foreground_threshold=args.foreground_threshold,
                               invert=args.invert_foreground)
    return write_pca(pairs, grid, args.out, views.ids)


def _embedding(args: argparse.Namespace) -> list[Path]:
    import torch

    from dinocell.eval.embedding_map import colour_values, embed_2d, plot_embedding, write_coordinates
    from dinocell.eval.features import extract

    device = device_of(args)
    model = load_model(args, device)
    dataset = _dataset(args)
    indices = None
    if args.max_samples is not None:
        if args.max_samples < 1:
            raise UsageError(f"--max-samples must be >= 1, got {args.max_samples}")
        count = min(args.max_samples, len(dataset))
        indices = [i * len(dataset) // count for i in range(count)]
    features = extract(model.backbone, dataset, model.transform, indices=indices, batch_size=args.batch_size,
                       num_workers=args.num_workers, device=device)
    if not len(features):
        raise EvalError("no usable sample to map (the dataset is empty or every sample was a bad file)")
    records = [{"id": i, "label": int(label), **meta}
               for i, label, meta in zip(features.ids, features.labels, features.meta, strict=True)]
    values = colour_values(records, args.color_by, features.classes)
    print(f"mapping {len(records)} features with {args.method.upper()}"
          + (" (its first call in a process compiles numba kernels: 30-60 s)" if args.method == "umap" else ""))
    cls = torch.nn.functional.normalize(torch.from_numpy(features.matrix("cls")), dim=-1)
    coords = embed_2d(cls, args.method, n_neighbors=args.n_neighbors, min_dist=args.min_dist, seed=args.seed)
    title = (f"{args.method.upper()} of {len(records)} cls features ({model.cfg.student.arch}), coloured by "
             f"{args.color_by}")
    return [
        plot_embedding(coords, values, args.out / f"embedding_{args.method}.png", title=title, column=args.color_by),
        write_coordinates(args.out / f"embedding_{args.method}.csv", records, coords, args.color_by, values),
    ]


def _montage(args: argparse.Namespace) -> list[Path]:
    from dinocell.commands.common import load_checked_config
    from dinocell.eval.montage import crop_montage
    from dinocell.eval.render import save_png
    from dinocell.pipeline.loaders import build_ssl_transform

    cfg = load_checked_config(args.config_file, args.overrides)
    dataset = _dataset(args)
    picture = crop_montage(dataset, build_ssl_transform(cfg), _indices(args, len(dataset)),
                           channel_names=_names(args), views=dataclasses.asdict(cfg.crops.channel_views))
    return [save_png(picture, args.out)]


@command("dinocell viz")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    draw = {"attention": _attention, "pca": _pca, "embedding": _embedding, "montage": _montage}[args.figure]
    written = draw(args)
    print(f"wrote {len(written)} file(s):")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
