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
from tqdm import tqdm


class _ChannelSums(Dataset):
    """Item i -> (sum [C], sum of squares [C], pixel count) of the wrapped dataset's image, in float64."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image = self.dataset[self.indices[i]]["image"].double()
        flat = image.reshape(image.shape[0], -1)
        return flat.sum(1), (flat * flat).sum(1), flat.shape[1]


def _add_up(items: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Collate in the worker: (sums, squares, pixels, images) of a batch."""
    channels = {s.shape[0] for s, _, _ in items}
    if len(channels) != 1:
        raise ValueError(f"images have different channel counts {sorted(channels)}; select channels explicitly")
    return sum(s for s, _, _ in items), sum(q for _, q, _ in items), sum(n for _, _, n in items), len(items)


def choose_indices(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded random subset of round(fraction * n) indices (at least 1), in ascending order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--fraction {fraction} must be in (0, 1], e.g. 0.2")
    count = max(1, round(fraction * n))
    return sorted(np.random.default_rng(seed).choice(n, size=count, replace=False).tolist())


def compute_mean_std(
    dataset: Dataset, fraction: float = 0.2, seed: int = 0, num_workers: int = 0, batch_size: int = 16
) -> dict:
    """Per-channel mean/std over a random `fraction` of `dataset` (progress bar on stderr)."""
    indices = choose_indices(len(dataset), fraction, seed)
    loader = DataLoader(
        _ChannelSums(dataset, indices), batch_size=batch_size, num_workers=num_workers, collate_fn=_add_up
    )
    total = squares = None
    pixels = 0
    with tqdm(total=len(indices), desc="mean-std", unit="img") as bar:
        for s, q, n, images in loader:
            if total is not None and s.shape != total.shape:
                raise ValueError(f"images have different channel counts ({len(total)} and {len(s)})")
            total, squares = (s, q) if total is None else (total + s, squares + q)
            pixels += n
            bar.update(images)
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp_min(0).sqrt()
    return {"mean": mean.tolist(), "std": std.tolist(), "n_images": len(indices), "n_pixels": pixels}
