"""Supervised fine-tuning: backbone + linear head on the cls token, the backbone frozen or trained with layer-wise
lr decay.

- Optimiser: AdamW with dinocell's parameter groups (block i of n gets lr x layerwise_decay ** (n + 1 - (i + 1)),
  no weight decay on biases, norms and tokens); the head gets the full lr.
- Schedule: per-iteration linear warmup to `lr`, then half-cosine to `min_lr` over `epochs` (planned for all epochs;
  early stopping may end sooner).
- Augmentation: a random-resized crop of the sample (area share `crop_scale`), the eval view of that crop (resize,
  channel rule, normalisation), a random horizontal flip, and with `rotate90` vertical flips and 90-degree turns
  (microscopy has no up). Random choices depend on (seed, epoch, index) only.
- After every epoch the validation set is scored; `monitor` (a metric, or the loss) drives early stopping (`patience`
  epochs without improvement; 0 = never) and the `best` checkpoint. `last` is written after every epoch.
- Resume: rerunning with the same output directory and settings continues after the last finished epoch, and the
  result is the one of an uninterrupted run (data order and augmentation are functions of (seed, epoch)).
- Files: checkpoints/{last,best}/checkpoint.pth (atomic), metrics.jsonl (one line per epoch).
- `quantize`: a frozen backbone in 8-bit or 4-bit (NF4) through bitsandbytes, CUDA only.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dinocell.eval.errors import EvalError
from dinocell.eval.features import SampleRecords, collate_records
from dinocell.eval.metrics import classification_metrics
from dinocell.layers.attention import LinearKMaskedBias
from dinocell.logging.progress import Progress
from dinocell.pipeline.augmentations import flip_rotate, sample_crop_box
from dinocell.train.checkpoint import atomic_save, capture_rng_state, restore_rng_state
from dinocell.train.optim import apply_schedule, param_groups
from dinocell.train.schedules import warmup_cosine

MODES = ("frozen", "full")
MONITORS = ("accuracy", "balanced_accuracy", "macro_f1", "loss")
QUANTIZE = ("8bit", "4bit")
CHECKPOINT_FILE = "checkpoint.pth"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that shapes the training; a resumed run must use the same values."""

    mode: str = "full"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 1
    weight_decay: float = 0.05
    layerwise_decay: float = 0.75
    monitor: str = "accuracy"
    patience: int = 5
    crop_scale: tuple[float, float] = (0.35, 1.0)
    rotate90: bool = False
    quantize: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        choices = (("mode", MODES), ("monitor", MONITORS), ("quantize", (None, *QUANTIZE)))
        for key, allowed in choices:
            if getattr(self, key) not in allowed:
                raise EvalError(f"{key}={getattr(self, key)!r} is not one of {', '.join(map(str, allowed))}")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise EvalError(f"{key}={getattr(self, key)} must be >= 1")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise EvalError(f"warmup_epochs={self.warmup_epochs} must lie in [0, epochs={self.epochs}]")
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0 or self.patience < 0:
            raise EvalError(f"need lr > 0, min_lr >= 0, weight_decay >= 0, patience >= 0; got {self.lr}, "
                            f"{self.min_lr}, {self.weight_decay}, {self.patience}")
        if not 0 < self.layerwise_decay <= 1:
            raise EvalError(f"layerwise_decay={self.layerwise_decay} must lie in (0, 1] (1 = no decay)")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise EvalError(f"crop_scale={list(self.crop_scale)} must be [low, high] with 0 < low <= high <= 1")
        if self.quantize and self.mode != "frozen":
            raise EvalError(f"quantize={self.quantize} needs mode=frozen: a quantised backbone cannot be trained")


class EarlyStopping:
    """Tracks the best value of the monitored metric; stop after `patience` epochs without a strict improvement."""

    def __init__(self, patience: int, maximize: bool) -> None:
        self.patience, self.maximize = patience, maximize
        self.best: float | None = None
        self.best_epoch = 0
        self.bad_epochs = 0

    def step(self, value: float, epoch: int) -> bool:
        """Record epoch `epoch`'s value; True when it is a new best."""
        improved = self.best is None or (value > self.best if self.maximize else value < self.best)
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


class Classifier(nn.Module):
    """Backbone + linear head on its normalised cls token (head: N(0, 0.01) weights, zero bias, as DINO's probes)."""

    def __init__(self, backbone: nn.Module, num_classes: int, *, frozen: bool) -> None:
        super().__init__()
        self.backbone, self.frozen = backbone, frozen
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        if frozen:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # a frozen backbone never runs drop path
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feats = self.backbone.forward_features(x)["x_norm_clstoken"]
        return self.head(feats.float())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold: the head, plus the backbone when it is trained. Keys are those of
        state_dict(), so `backbone.*` of a fully fine-tuned checkpoint loads with load_pretrained."""
        return {k: v for k, v in self.state_dict().items() if not (self.frozen and k.startswith("backbone."))}


class TrainViews(Dataset):
    """Item (index, epoch) -> (augmented image, label); see the module docstring for the augmentation."""

    def __init__(self, dataset: Dataset, eval_transform: Any, settings: FinetuneSettings) -> None:
        self.dataset, self.eval_transform, self.s = dataset, eval_transform, settings

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = item
        sample = self.dataset[index]
        label = int(sample.get("label", -1))
        if label < 0:
            raise EvalError(f"training sample {sample.get('id', index)!r} has no label (-1); fine-tuning needs labels")
        rng = random.Random(f"{self.s.seed}:{epoch}:{index}")
        image = sample["image"]
        top, left, h, w = sample_crop_box(image.shape[-2], image.shape[-1], self.s.crop_scale, rng)
        view = self.eval_transform({**sample, "image": image[:, top : top + h, left : left + w]})
        view = view if isinstance(view, torch.Tensor) else view["image"]
        hflip = rng.random() < 0.5
        vflip, turns = (rng.random() < 0.5, rng.randrange(4)) if self.s.rotate90 else (False, 0)
        return flip_rotate(view, hflip, vflip, turns), label


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    """The batches of (index, epoch) items of one epoch: a permutation that depends on (seed, epoch) only."""
    order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    return [[(i, epoch) for i in order[s : s + batch_size]] for s in range(0, n, batch_size)]


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    dataset: Dataset,
    transform: Any,
    *,
    num_classes: int,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Metrics (accuracy, balanced_accuracy, macro_f1, per_class_accuracy, top5, loss) of the labelled samples;
    substitutes of bad samples are skipped and counted (`skipped`)."""
    loader = DataLoader(SampleRecords(dataset, transform), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_records)
    was_training = model.training
    model.eval()
    logits, labels, skipped = [], [], 0
    try:
        for images, kept, bad in loader:
            skipped += len(bad)
            if images is not None:
                with _autocast(device):
                    logits.append(model(images.to(device)).float().cpu())
                labels.extend(r["label"] for r in kept)
    finally:
        model.train(was_training)
    if not labels:
        raise EvalError("the evaluation set has no usable sample")
    scores, y = torch.cat(logits), torch.tensor(labels)
    if y.min() < 0 or y.max() >= num_classes:
        raise EvalError(f"evaluation labels must lie in [0, {num_classes - 1}], found [{int(y.min())}, {int(y.max())}]")
    metrics = classification_metrics(y.numpy(), scores.argmax(1).numpy(), scores=scores.numpy(),
                                     class_names=class_names)
    return {**metrics, "loss": float(F.cross_entropy(scores, y)), "skipped": skipped}


def quantize_backbone(backbone: nn.Module, mode: str, device: torch.device) -> None:
    """Replace every linear layer of a frozen backbone by a bitsandbytes 8-bit or 4-bit (NF4) layer, in place."""
    if device.type != "cuda":
        raise EvalError(f"quantize={mode} runs bitsandbytes kernels, which need a CUDA GPU; on {device} run "
                        "without quantisation")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise EvalError(f"quantize={mode} needs bitsandbytes, which is not installed: pip install bitsandbytes "
                        "(or pip install 'dinocell[quantize]')") from None
    for parent in list(backbone.modules()):
        for name, layer in list(parent.named_children()):
            if not isinstance(layer, nn.Linear):
                continue
            bias = layer.bias * layer.bias_mask if isinstance(layer, LinearKMaskedBias) else layer.bias
            weight = layer.weight.detach().cpu()
            if mode == "8bit":
                new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias is not None,
                                          has_fp16_weights=False)
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias is not None,
                                        compute_dtype=torch.bfloat16, quant_type="nf4")
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            if bias is not None:
                new.bias = nn.Parameter(bias.detach().cpu().clone(), requires_grad=False)
            setattr(parent, name, new)
    backbone.to(device)  # bitsandbytes quantises the weights on their way to the GPU


def _resume(path: Path, model: Classifier, optimizer: torch.optim.Optimizer, stopper: EarlyStopping,
            description: dict) -> tuple[int, bool]:
    """(epochs done, finished) from the last checkpoint, after checking it was written with the same settings."""
    if not path.is_file():
        return 0, False
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = [k for k in sorted(set(description) | set(state["description"]))
               if description.get(k) != state["description"].get(k)]
    if changed:
        k = changed[0]
        raise EvalError(f"{path.parent.parent.parent} holds a fine-tuning run with other settings ({k}: "
                        f"{state['description'].get(k)!r} there, {description.get(k)!r} now); rerun with the same "
                        "settings to resume it, or use another output directory")
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    stopper.load_state_dict(state["early_stopping"])
    restore_rng_state(state["rng"])
    return int(state["epoch"]), bool(state["finished"])


def _keep_metrics_until(path: Path, epoch: int) -> None:
    """A resumed run repeats the epochs after its checkpoint: drop their lines (atomically)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= epoch]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def finetune(
    backbone: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    eval_transform: Any,
    output_dir: str | Path,
    *,
    num_classes: int,
    settings: FinetuneSettings,
    device: torch.device | str,
    num_workers: int = 0,
    test_set: Dataset | None = None,
    class_names: Sequence[str] | None = None,
    description: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> dict:
    """Train (or resume, or only re-score a finished run) and return the results: the best epoch, its validation
    metrics, and the test metrics of the best checkpoint when `test_set` is given.

    `eval_transform` is the deterministic eval view (dinocell's eval transform); `description` (model source,
    dataset strings, ...) is stored in the checkpoints and must match on resume, like `settings`.
    """
    device = torch.device(device)
    out = Path(output_dir)
    last_path, best_path = (out / "checkpoints" / name / CHECKPOINT_FILE for name in ("last", "best"))
    if len(train_set) == 0:  # type: ignore[arg-type]
        raise EvalError("the training set is empty")
    torch.manual_seed(settings.seed)
    model = Classifier(backbone, num_classes, frozen=settings.mode == "frozen")
    if settings.quantize:
        quantize_backbone(model.backbone, settings.quantize, device)
    model.to(device)
    groups = param_groups(model, n_blocks=backbone.n_blocks, layerwise_decay=settings.layerwise_decay,
                          patch_embed_lr_mult=1.0)
    optimizer = torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0)
    iters_per_epoch = math.ceil(len(train_set) / settings.batch_size)  # type: ignore[arg-type]
    lr_schedule = warmup_cosine(0.0, settings.lr, settings.min_lr,
                                warmup_iters=settings.warmup_epochs * iters_per_epoch,
                                total_iters=settings.epochs * iters_per_epoch)
    stopper = EarlyStopping(settings.patience, maximize=settings.monitor != "loss")
    description = {**(description or {}), **asdict(settings), "num_classes": num_classes,
                   "n_train": len(train_set)}  # type: ignore[arg-type]
    description["crop_scale"] = list(settings.crop_scale)  # as torch.load gives it back
    start_epoch, finished = _resume(last_path, model, optimizer, stopper, description)
    out.mkdir(parents=True, exist_ok=True)
    _keep_metrics_until(out / METRICS_FILE, start_epoch)
    views = TrainViews(train_set, eval_transform, settings)
    eval_args = dict(num_classes=num_classes, batch_size=settings.batch_size, num_workers=num_workers,
                     device=device, class_names=class_names)
    epoch = start_epoch
    while not finished:
        start = time.monotonic()
        model.train()
        batches = epoch_batches(len(views), settings.batch_size, settings.seed, epoch)
        loader = DataLoader(views, batch_sampler=batches, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
        losses = []
        with Progress(len(batches), f"epoch {epoch + 1}/{settings.epochs}", "batch", enabled=show_progress) as bar:
            for step, (images, labels) in enumerate(loader):
                lr = float(lr_schedule[epoch * iters_per_epoch + step])
                apply_schedule(optimizer, lr=lr, last_layer_lr=lr, weight_decay=settings.weight_decay)
                with _autocast(device):
                    logits = model(images.to(device, non_blocking=True))
                loss = F.cross_entropy(logits.float(), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                bar.update()
        epoch += 1
        val = evaluate_classifier(model, val_set, eval_transform, **eval_args)
        value = val[settings.monitor]
        if stopper.step(value, epoch):
            atomic_save({"model": model.trainable_state(), "epoch": epoch, "monitor": settings.monitor,
                         "value": value, "description": description}, best_path.parent, CHECKPOINT_FILE)
        finished = stopper.should_stop or epoch == settings.epochs
        record = {"epoch": epoch, "lr": lr, "train_loss": float(np.mean(losses)),
                  **{f"val_{k}": v for k, v in val.items() if k != "per_class_accuracy"},
                  "best_epoch": stopper.best_epoch, "epoch_time_s": round(time.monotonic() - start, 3)}
        with open(out / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        atomic_save({"model": model.trainable_state(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                     "finished": finished, "early_stopping": stopper.state_dict(), "rng": capture_rng_state(),
                     "description": description}, last_path.parent, CHECKPOINT_FILE)
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"], strict=False)
    results = {
        "best_epoch": int(best["epoch"]),
        "epochs_run": epoch,
        "stopped_early": epoch < settings.epochs,
        "monitor": settings.monitor,
        "val": evaluate_classifier(model, val_set, eval_transform, **eval_args),
        "checkpoints": {"best": str(best_path), "last": str(last_path)},
    }
    if test_set is not None:
        results["test"] = evaluate_classifier(model, test_set, eval_transform, **eval_args)
    return results
