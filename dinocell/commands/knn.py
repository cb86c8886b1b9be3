"""`dinocell knn`: weighted k-NN accuracy of a checkpoint's features on labelled datasets (DINO protocol)."""

from __future__ import annotations

import argparse
import os

import torch

from dinocell.commands.common import load_checked_config
from dinocell.config import ConfigError
from dinocell.data import make_dataset
from dinocell.eval.features import extract_features
from dinocell.eval.knn import knn_classify
from dinocell.models import build_backbone, load_pretrained
from dinocell.pipeline.loaders import build_eval_transform


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinocell knn",
        description=(
            "Weighted k-NN top-1 accuracy of a backbone's L2-normalised cls features: features of the --train set "
            "vote for the labels of the --test set (DINO protocol). Settings not given as options come from "
            "--config-file (e.g. a run's output_dir/config.yaml) on top of dinocell's default config, so the eval "
            "view (crop size, channels, normalisation) matches training."
        ),
        epilog=(
            "example: dinocell knn --config-file output/config.yaml "
            "--checkpoint output/eval/final/teacher_checkpoint.pth --train SyntheticCellPainting:split=train:size=400 "
            "--test SyntheticCellPainting:split=test:size=200 --k 10 20"
        ),
    )
    add = parser.add_argument
    add(
        "--checkpoint",
        metavar="PATH",
        help="weights to evaluate: eval dump (DINO teacher_checkpoint.pth, SimCLR student_checkpoint.pth) or its "
        "directory, training checkpoint dir/file (e.g. ckpt/best), official DINOv3 backbone file, torchvision ResNet "
        "file or Hugging Face DINOv3 dir; omit to score a randomly initialised backbone (a baseline)",
    )
    add("--config-file", metavar="YAML", help="YAML config (a run's config.yaml or a recipe); options below win")
    add("--arch", metavar="NAME", help="backbone architecture (student.arch), e.g. vit_small")
    add("--patch-size", type=int, metavar="P", help="patch size in pixels (student.patch_size)")
    add("--in-chans", type=int, metavar="C", help="input channels of the backbone (student.in_chans)")
    add("--n-storage-tokens", type=int, metavar="R", help="storage (register) tokens (student.n_storage_tokens)")
    add("--image-size", type=int, metavar="PX", help="side of the centre-cropped eval view (crops.global_crops_size)")
    add("--train", metavar="DATASET", help="labelled reference dataset string (default: evaluation.knn_train_dataset)")
    add("--test", metavar="DATASET", help="labelled query dataset string (default: evaluation.knn_test_dataset)")
    add("--k", type=int, nargs="+", metavar="K", help="numbers of neighbours to report (default: evaluation.knn_k)")
    add("--temperature", type=float, metavar="T", help="vote weight exp(sim / T) (default: evaluation.knn_temperature)")
    add("--batch-size", type=int, default=64, metavar="N", help="images per forward pass (default: 64)")
    add("--num-workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
        help="data-loading worker processes (default: min(4, CPUs))")
    add("--device", metavar="DEV", help="torch device (default: cuda if available, else cpu)")
    add("--seed", type=int, default=0, help="seed of the random initialisation (default: 0)")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    """Command-line options as config dotlist entries, so the config validates them like any other value."""
    keys = {
        "arch": "student.arch",
        "patch_size": "student.patch_size",
        "in_chans": "student.in_chans",
        "n_storage_tokens": "student.n_storage_tokens",
        "image_size": "crops.global_crops_size",
        "temperature": "evaluation.knn_temperature",
    }
    return [f"{key}={getattr(args, name)}" for name, key in keys.items() if getattr(args, name) is not None]


def _num_classes(datasets: list, labels: list[torch.Tensor]) -> int:
    """Class count from the datasets' `classes` when they expose it, else from the largest label seen."""
    counts = [len(d.classes) for d in datasets if d.classes is not None]
    return max(counts) if counts else int(max(int(t.max()) for t in labels if t.numel())) + 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_checked_config(args.config_file, _overrides(args))
    except ConfigError as error:
        raise SystemExit(f"dinocell knn: {error}") from None
    ev = cfg.evaluation
    # dataset strings are used verbatim (not passed through the config parser, which would read e.g. '${' or '[')
    dataset_strings = [args.train or ev.knn_train_dataset, args.test or ev.knn_test_dataset]
    if not all(dataset_strings):
        raise SystemExit("dinocell knn: give --train and --test dataset strings (or set evaluation.knn_*_dataset)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    s = cfg.student
    backbone = build_backbone(s.arch, **s.backbone_kwargs())
    if args.checkpoint:
        print(load_pretrained(backbone, args.checkpoint))
    else:
        print(f"no --checkpoint: scoring a randomly initialised {s.arch} (seed {args.seed}) as a baseline")
    backbone.to(device)
    transform = build_eval_transform(cfg)
    datasets = [make_dataset(d) for d in dataset_strings]
    (train_x, train_y), (test_x, test_y) = (
        extract_features(
            backbone, d, transform, batch_size=args.batch_size, num_workers=args.num_workers, device=device
        )
        for d in datasets
    )
    num_classes = _num_classes(datasets, [train_y, test_y])
    print(f"k-NN: {len(train_y)} reference / {len(test_y)} query samples, {num_classes} classes, "
          f"T={ev.knn_temperature}")
    for k in args.k or [ev.knn_k]:
        top1 = knn_classify(train_x, train_y, test_x, test_y, k, ev.knn_temperature, num_classes)
        print(f"k={k}: top-1 {top1:.2f}%")
    return 0
