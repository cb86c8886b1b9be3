"""`dinocell viz attention|pca|embedding|montage`: pictures of what a model learned and of what it is fed.

The model is built from the config (default YAML <- --config-file <- key=value overrides, as for `dinocell train`)
and its weights come from --checkpoint (anything dinocell.models.load_pretrained accepts). Images come from a
dataset string (--dataset) or from files (--images, TIFF/PNG/JPEG/NPZ), seen through the eval view of the config
(centre crop of crops.global_crops_size, channel rule, crops.channel_mean/std).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from dinocell.commands.boundary import add_debug_option, command
from dinocell.errors import UsageError

EXAMPLE_MODEL = "--config-file run/config.yaml --checkpoint run/eval/final/teacher_checkpoint.pth"
EXAMPLES = {
    "attention": f"dinocell viz attention {EXAMPLE_MODEL} --dataset SyntheticCellPainting:split=test --num-images 4 "
    "--masks --out attention/",
    "pca": f"dinocell viz pca {EXAMPLE_MODEL} --images cell1.tif cell2.tif --foreground-threshold 0.5 --out pca/",
    "embedding": f"dinocell viz embedding {EXAMPLE_MODEL} --dataset SyntheticCellPainting:split=test:size=400 "
    "--color-by label --out embedding/",
    "montage": "dinocell viz montage --config-file configs/train/demo.yaml --dataset SyntheticCellPainting "
    "--num-images 3 --out montage.png crops.local_crops_number=4",
}


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-file", metavar="YAML",
                        help="the run's config.yaml or a recipe (model size, patch size, channels, crops, "
                        "normalisation)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. student.arch=vit_small crops.global_crops_size=448")
    add_debug_option(parser)


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="weights: eval dump teacher_checkpoint.pth, training checkpoint dir/file, official DINOv3 "
                        "backbone file or Hugging Face DINOv3 dir; omit to look at a randomly initialised backbone")
    parser.add_argument("--device", metavar="DEV", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random initialisation (default: 0)")


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
    _add_config(attention)
    _add_model(attention)
    _add_images(attention, 4)
    attention.add_argument("--masks", type=float, nargs="?", const=0.6, metavar="SHARE",
                           help="also draw DINO's masks: the patches that hold SHARE of a head's attention "
                           "(default when given without a value: 0.6)")
    attention.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")

    pca = sub("pca", "first three PCA components of the patch tokens as RGB, fitted over all images given: "
              "<id>_pca.png per image and pca_grid.png")
    _add_config(pca)
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
    _add_config(embedding)
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
    _add_config(montage)
    _add_images(montage, 4)
    montage.add_argument("--out", type=Path, required=True, metavar="PNG", help="output PNG file")
    return parser


def _config(args: argparse.Namespace) -> Any:
    from dinocell.commands.common import load_checked_config

    return load_checked_config(args.config_file, args.overrides)


def _backbone(cfg: Any, args: argparse.Namespace) -> tuple[torch.nn.Module, torch.device]:
    from dinocell.models import build_backbone, load_pretrained

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    s = cfg.student
    backbone = build_backbone(s.arch, **s.backbone_kwargs())
    if args.checkpoint:
        print(load_pretrained(backbone, args.checkpoint))
    else:
        print(f"no --checkpoint: a randomly initialised {s.arch} (seed {args.seed})")
    return backbone.to(device).eval(), device


def _dataset(args: argparse.Namespace) -> Any:
    if args.images:
        overrides = [str(p) for p in args.images if "=" in p.name and not p.exists()]
        if overrides:
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


# The crop pipeline is used here only.
def _model_view(cfg: Any) -> Any:
    """sample -> sample whose image is what the model sees (eval view of the config)."""
    from dinocell.pipeline.loaders import build_eval_transform

    return build_eval_transform(cfg)


def _display_view(cfg: Any, sample: dict) -> torch.Tensor:
    """The model view's pixels with every channel of the sample and no normalisation, for composites."""
    from dinocell.pipeline.transforms import EvalTransform

    return EvalTransform(int(cfg.crops.global_crops_size), sample["image"].shape[0], None, None)(sample)["image"]


def _crop_transform(cfg: Any) -> Any:
    """(sample, position) -> global and local crops: the training transform of the config."""
    from dinocell.pipeline.loaders import build_ssl_transform

    return build_ssl_transform(cfg)


def _views(args: argparse.Namespace, cfg: Any) -> tuple[torch.Tensor, list, list[str]]:
    """Model inputs [B, C, S, S], display pictures and ids of the chosen samples."""
    from dinocell.eval.render import composite

    dataset, model_view = _dataset(args), _model_view(cfg)
    samples = [dataset[i] for i in _indices(args, len(dataset))]
    images = torch.stack([model_view(s)["image"] for s in samples])
    pictures = [composite(_display_view(cfg, s), _names(args)) for s in samples]
    return images, pictures, [str(s.get("id", i)) for i, s in enumerate(samples)]


def _attention(args: argparse.Namespace) -> list[Path]:
    from dinocell.eval.attention_maps import attention_figures, cls_attention_maps, write_attention

    cfg = _config(args)
    backbone, device = _backbone(cfg, args)
    images, pictures, ids = _views(args, cfg)
    attention = cls_attention_maps(backbone, images.to(device))
    written = []
    for k, (picture, sample_id) in enumerate(zip(pictures, ids)):
        figures = attention_figures(picture, attention, k, backbone.patch_size, mass_share=args.masks)
        written += write_attention(figures, args.out, sample_id)
    return written


def _pca(args: argparse.Namespace) -> list[Path]:
    from dinocell.eval.pca_maps import patch_tokens, pca_feature_maps, pca_figures, write_pca

    cfg = _config(args)
    backbone, device = _backbone(cfg, args)
    images, pictures, ids = _views(args, cfg)
    rgb, _ = pca_feature_maps(patch_tokens(backbone, images.to(device)), args.foreground_threshold,
                              args.invert_foreground)
    return write_pca(*pca_figures(pictures, rgb, backbone.patch_size, ids), args.out, ids)


def _embedding(args: argparse.Namespace) -> list[Path]:
    from torch.utils.data import Subset

    from dinocell.eval.embedding_map import (
        colour_values,
        embed_2d,
        extract_cls_records,
        plot_embedding,
        write_coordinates,
    )

    cfg = _config(args)
    backbone, device = _backbone(cfg, args)
    dataset = _dataset(args)
    if args.max_samples is not None:
        if args.max_samples < 1:
            raise UsageError(f"--max-samples must be >= 1, got {args.max_samples}")
        count = min(args.max_samples, len(dataset))
        dataset = Subset(dataset, [i * len(dataset) // count for i in range(count)])
    features, records = extract_cls_records(backbone, dataset, _model_view(cfg),
                                            batch_size=args.batch_size, num_workers=args.num_workers, device=device)
    values = colour_values(records, args.color_by, getattr(getattr(dataset, "dataset", dataset), "classes", None))
    print(f"mapping {len(records)} features with {args.method.upper()}"
          + (" (its first call in a process compiles numba kernels: 30-60 s)" if args.method == "umap" else ""))
    coords = embed_2d(features, args.method, n_neighbors=args.n_neighbors, min_dist=args.min_dist, seed=args.seed)
    title = f"{args.method.upper()} of {len(records)} cls features ({cfg.student.arch}), coloured by {args.color_by}"
    return [
        plot_embedding(coords, values, args.out / f"embedding_{args.method}.png", title=title, column=args.color_by),
        write_coordinates(args.out / f"embedding_{args.method}.csv", records, coords, args.color_by, values),
    ]


def _montage(args: argparse.Namespace) -> list[Path]:
    from dinocell.eval.montage import crop_montage
    from dinocell.eval.render import save_png

    cfg = _config(args)
    dataset = _dataset(args)
    picture = crop_montage(dataset, _crop_transform(cfg), _indices(args, len(dataset)),
                           channel_names=_names(args), views=dataclasses.asdict(cfg.crops.channel_views))
    return [save_png(picture, args.out)]


@command("dinocell viz")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = {"attention": _attention, "pca": _pca, "embedding": _embedding, "montage": _montage}[args.figure]
    written = run(args)
    print(f"wrote {len(written)} file(s):")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
