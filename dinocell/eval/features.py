"""Extract L2-normalised cls features of a labelled dataset, the input of k-NN and linear evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dinocell.logging.progress import progress

# sample record -> the image the model sees, or a record holding it under "image" (as EvalTransform returns)
SampleTransform = Callable[[dict[str, Any]], torch.Tensor | dict[str, Any]]


class _ImageLabelDataset(Dataset):
    """(image, label) pairs from sample records, so that DataLoader workers run the dataset and the transform."""

    def __init__(self, dataset: Dataset, transform: SampleTransform | None) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _pair(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        if self.transform is None:
            return sample["image"], int(sample["label"])
        view = self.transform(sample)
        return (view if isinstance(view, torch.Tensor) else view["image"]), int(sample["label"])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._pair(self.dataset[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Keep batch-concurrent datasets (S3) concurrent: fetch the batch through their own __getitems__."""
        getitems = getattr(self.dataset, "__getitems__", None)
        samples = getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]
        return [self._pair(s) for s in samples]


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    transform: SampleTransform | None,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] float32 (rows L2-normalised, on CPU) and labels [N] int64, in dataset order.

    `model(x)` must return one feature vector per image (a dinocell backbone returns its normalised cls token).
    `transform` maps a sample record to the image fed to the model (a deterministic eval view), or to a record
    holding it under "image" (dinocell.data.loaders.build_eval_transform(cfg) can be passed as is); None feeds
    sample["image"] unchanged (all images must then have the same size). The model runs in eval mode; its previous
    mode is restored afterwards.
    """
    loader = DataLoader(
        _ImageLabelDataset(dataset, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
    )
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        for images, batch_labels in progress(loader, desc="features", unit="batch", leave=False):
            out = model(images.to(device, non_blocking=True))
            features.append(F.normalize(out.float(), p=2, dim=-1).cpu())
            labels.append(batch_labels.to(torch.int64))
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("extract_features got an empty dataset; expected at least one sample")
    return torch.cat(features), torch.cat(labels)
