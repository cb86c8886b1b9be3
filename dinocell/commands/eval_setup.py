"""What the `dinocell eval <task>` commands share: model options, the model and its eval view, inputs that are
either exported feature directories or dataset strings, and the boundary that turns user errors into one line.

The model options mirror the config keys they set, so a run's own `config.yaml` (--config-file) reproduces its eval
view (crop size, channels, normalisation) and the options only override it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dinocell.eval.errors import EvalError

# option -> config key it overrides
MODEL_KEYS = {
    "arch": "student.arch",
    "patch_size": "student.patch_size",
    "in_chans": "student.in_chans",
    "n_storage_tokens": "student.n_storage_tokens",
    "image_size": "crops.global_crops_size",
}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (needed when an input is a dataset string)")
    add = group.add_argument
    add("--checkpoint", metavar="PATH",
        help="weights: eval dump teacher_checkpoint.pth, training checkpoint dir/file, fine-tuning checkpoint, "
        "official DINOv3 backbone file or Hugging Face DINOv3 dir; omit for a randomly initialised backbone (baseline)")
    add("--config-file", metavar="YAML", help="a run's config.yaml (or a recipe): architecture and eval view; "
        "the options below win")
    add("--arch", metavar="NAME", help="backbone architecture (student.arch), e.g. vit_small")
    add("--patch-size", type=int, metavar="P", help="patch size in pixels (student.patch_size)")
    add("--in-chans", type=int, metavar="C", help="input channels of the backbone (student.in_chans)")
    add("--n-storage-tokens", type=int, metavar="R", help="storage (register) tokens (student.n_storage_tokens)")
    add("--image-size", type=int, metavar="PX", help="side of the centre-cropped eval view (crops.global_crops_size)")
    add("--seed", type=int, default=0, help="seed of the random initialisation and of any random split (default 0)")


def add_run_options(parser: argparse.ArgumentParser, batch_size: int = 64) -> None:
    add = parser.add_argument
    add("--output-dir", required=True, metavar="DIR", help="where the results (JSON and a table) are written")
    add("--batch-size", type=int, default=batch_size, metavar="N", help=f"images per step (default {batch_size})")
    add("--num-workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
        help="data-loading worker processes (default: min(4, CPUs))")
    add("--device", metavar="DEV", help="torch device (default: cuda if available, else cpu)")


def device_of(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class Model:
    """A backbone ready for evaluation, the eval transform of its config, and a description for the results."""

    backbone: torch.nn.Module
    transform: Any
    cfg: Any
    description: dict[str, Any] = field(default_factory=dict)


def load_model(args: argparse.Namespace, device: torch.device, *, verbose: bool = True) -> Model:
    """Config (file + options) -> backbone with the --checkpoint weights (or random, seeded) on `device`."""
    from dinocell.commands.common import load_checked_config
    from dinocell.models import build_backbone, load_pretrained
    from dinocell.pipeline.loaders import build_eval_transform

    overrides = [f"{key}={getattr(args, name)}" for name, key in MODEL_KEYS.items() if getattr(args, name) is not None]
    overrides.append("crops.local_crops_number=0")  # evaluation cuts no local crops: their size rules do not apply
    cfg = load_checked_config(args.config_file, overrides)
    s = cfg.student
    torch.manual_seed(args.seed)
    backbone = build_backbone(s.arch, **s.backbone_kwargs())
    if args.checkpoint:
        try:
            report = load_pretrained(backbone, args.checkpoint)
        except ValueError as error:
            raise EvalError(str(error)) from None
        message = str(report)
    else:
        message = f"no --checkpoint: a randomly initialised {s.arch} (seed {args.seed}), the baseline"
    if verbose:
        print(message, flush=True)
    crops = cfg.crops
    description = {
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "arch": s.arch,
        "patch_size": s.patch_size,
        "in_chans": s.in_chans,
        "n_storage_tokens": s.n_storage_tokens,
        "image_size": crops.global_crops_size,
        "channel_mean": None if crops.channel_mean is None else [float(v) for v in crops.channel_mean],
        "channel_std": None if crops.channel_std is None else [float(v) for v in crops.channel_std],
    }
    if not args.checkpoint:
        description["seed"] = args.seed
    return Model(backbone.to(device), build_eval_transform(cfg), cfg, description)


class Inputs:
    """Loads each input as features: an exported feature directory as it is, a dataset string through the model
    (built once, on first need)."""

    def __init__(self, args: argparse.Namespace, kinds: tuple[str, ...] = ("cls",)) -> None:
        self.args, self.kinds = args, kinds
        self.device = device_of(args)
        self.model: Model | None = None
        self.sources: dict[str, str] = {}

    def get_model(self) -> Model:
        if self.model is None:
            self.model = load_model(self.args, self.device)
        return self.model

    def features(self, location: str, name: str) -> Any:
        from dinocell.data import make_dataset
        from dinocell.eval.features import extract, is_feature_dir, load_features

        if is_feature_dir(location):
            self.sources[name] = f"features {location}"
            return load_features(location)
        model = self.get_model()
        dataset = make_dataset(location)
        self.sources[name] = f"dataset {location}"
        print(f"{name}: extracting features of {len(dataset)} samples ({location})", flush=True)
        return extract(model.backbone, dataset, model.transform, kinds=self.kinds, batch_size=self.args.batch_size,
                       num_workers=self.args.num_workers, device=self.device)

    def description(self) -> dict[str, Any]:
        return {"inputs": self.sources, **({"model": self.model.description} if self.model else {})}


def run(prog: str, body: Callable[[], int], user_errors: tuple[type[Exception], ...] = ()) -> int:
    """Run a command body; a user error (bad value, missing file or optional package, bad dataset string or
    config, or one of `user_errors`) becomes one line on stderr and exit code 2. Anything else is a bug and keeps its
    traceback."""
    from dinocell.config import ConfigError
    from dinocell.data.registry import DatasetStringError

    try:
        return body()
    except (EvalError, ConfigError, DatasetStringError, FileNotFoundError, ImportError, *user_errors) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2


def labelled(features: Any, kind: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D], labels [N]) of a labelled FeatureSet; unlabelled rows (-1) are an error."""
    unlabelled = int((features.labels < 0).sum())
    if unlabelled:
        raise EvalError(f"{unlabelled} of {len(features)} samples of {name} have no label (-1); this evaluation "
                        "needs a labelled dataset (e.g. class folders)")
    if not len(features):
        raise EvalError(f"{name} has no usable sample")
    return torch.from_numpy(features.matrix(kind)), torch.from_numpy(features.labels)


def class_info(*feature_sets: Any) -> tuple[int, list[str] | None]:
    """(number of classes, class names): the first set's `classes` when known, else the largest label + 1."""
    for features in feature_sets:
        if features.classes:
            return len(features.classes), list(features.classes)
    return int(max(int(f.labels.max()) for f in feature_sets if len(f))) + 1, None


def add_feature_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", default="cls", choices=("cls", "patch_mean", "cls+patch_mean"),
                        help="which features: the cls token (default), the mean patch token, or both concatenated "
                        "(DINOv2's linear-probe input); feature directories must hold them")
