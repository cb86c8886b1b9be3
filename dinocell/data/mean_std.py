"""Per-channel mean and std of a dataset over a random fraction of its images (scDINO step).

The JSON it writes (`{"mean": [...], "std": [...], ...}`) is what `SingleCellFolder:stats=...` reads. Images are
loaded by DataLoader workers, each of which reduces its images to per-channel sums in float64, so the main process
only adds small vectors and images of different sizes need no padding. The std is the population std over all
pixels of the chosen images (every pixel weighs the same, as in scDINO).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinocell.data.dataset import DatasetError
from dinocell.data.io.bad_files import is_substitute
from dinocell.errors import UsageError
from dinocell.logging.progress import Progress

Sums = tuple[torch.Tensor, torch.Tensor, int]  # per-channel sum [C], sum of squares [C], pixels per channel


class _ChannelSums(Dataset):
    """Item i -> the Sums of the wrapped dataset's image in float64, or None when the dataset substituted another
    image for a bad file (that image is counted at its own index, if chosen, and never twice)."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sums | None:
        sample = self.dataset[self.indices[i]]
        if is_substitute(sample):
            return None
        image = sample["image"].double()
        flat = image.reshape(image.shape[0], -1)
        return flat.sum(1), (flat * flat).sum(1), flat.shape[1]


def _add_up(items: list[Sums | None]) -> tuple[Sums | None, int, int]:
    """Collate in the worker: (the batch's Sums or None, images, skipped bad files)."""
    good = [item for item in items if item is not None]
    channels = {s.shape[0] for s, _, _ in good}
    if len(channels) > 1:
        raise DatasetError(f"images have different channel counts {sorted(channels)}; select channels explicitly")
    sums = (sum(s for s, _, _ in good), sum(q for _, q, _ in good), sum(n for _, _, n in good)) if good else None
    return sums, len(good), len(items) - len(good)


def choose_indices(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded random subset of round(fraction * n) indices (at least 1), in ascending order."""
    if not 0.0 < fraction <= 1.0:
        raise UsageError(f"--fraction {fraction} must be in (0, 1], e.g. 0.2")
    count = max(1, round(fraction * n))
    return sorted(np.random.default_rng(seed).choice(n, size=count, replace=False).tolist())


def compute_mean_std(
    dataset: Dataset, fraction: float = 0.2, seed: int = 0, num_workers: int = 0, batch_size: int = 16
) -> dict:
    """Per-channel mean/std over a random `fraction` of `dataset` (progress on stderr). Chosen samples that are bad
    files are skipped, not replaced: `n_images` counts the images used, `n_skipped` the bad files left out."""
    indices = choose_indices(len(dataset), fraction, seed)
    loader = DataLoader(
        _ChannelSums(dataset, indices), batch_size=batch_size, num_workers=num_workers, collate_fn=_add_up
    )
    total = squares = None
    pixels = images = skipped = 0
    with Progress(len(indices), "mean-std", "img") as bar:
        for sums, good, bad in loader:
            images, skipped = images + good, skipped + bad
            bar.update(good + bad)
            if sums is None:
                continue
            s, q, n = sums
            if total is not None and s.shape != total.shape:
                raise DatasetError(f"images have different channel counts ({len(total)} and {len(s)})")
            total, squares = (s, q) if total is None else (total + s, squares + q)
            pixels += n
    if total is None:
        raise DatasetError(f"all {len(indices)} chosen images are bad files (see the warnings); nothing to average")
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp_min(0).sqrt()
    return {"mean": mean.tolist(), "std": std.tolist(), "n_images": images, "n_skipped": skipped, "n_pixels": pixels}
