"""Per-image, per-channel intensity normalisation shared by the dataset families.

Microscopy intensities differ by orders of magnitude between channels, plates and microscopes, so each field is
brought to a comparable range before augmentation. All functions take and return float32 [C, H, W] tensors and keep
full precision (16-bit data is never quantised).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args

import torch

from dinocell.data.dataset import DatasetError

# The type of a dataset's `normalization=` key: the registry checks dataset strings against it.
Normalization = Literal["percentile", "zscore", "minmax", "none"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)


def check_normalization(method: str, owner: str) -> None:
    """Fail when a dataset is built, not at its first sample in a worker."""
    if method not in NORMALIZATIONS:
        raise DatasetError(f"{owner}: normalization='{method}' is not one of {', '.join(NORMALIZATIONS)}")


def percentile_normalize(image: torch.Tensor, low: float = 0.1, high: float = 99.9) -> torch.Tensor:
    """Map each channel's [low, high] percentile range to [0, 1] and clip; a flat channel becomes 0.

    Percentiles are nearest-rank values of a fixed strided subset (at most 65,536 values per channel, found by
    selection rather than sorting): this runs on every field the loader decodes, and a 1080 px field is 1.2M values
    per channel whose exact 0.1 % tail changes nothing visible.
    """
    flat = _subsample(image.reshape(image.shape[0], -1).float())
    n = flat.shape[1]
    lo = flat.kthvalue(round(low / 100 * (n - 1)) + 1, dim=1).values.view(-1, 1, 1)
    hi = flat.kthvalue(round(high / 100 * (n - 1)) + 1, dim=1).values.view(-1, 1, 1)
    span = hi - lo
    scale = torch.where(span > 1e-12, 1.0 / span.clamp_min(1e-12), torch.zeros_like(span))
    return (image.float() - lo).mul_(scale).clamp_(0.0, 1.0)


def zscore_normalize(image: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit variance per channel; a flat channel becomes 0."""
    flat = image.reshape(image.shape[0], -1).float()
    mean = flat.mean(1).view(-1, 1, 1)
    std = flat.std(1, unbiased=False).view(-1, 1, 1)
    return (image - mean) / (std + eps)


def minmax_normalize(image: torch.Tensor) -> torch.Tensor:
    """scDINO's per-channel min-max to [0, 1]; a channel whose max equals its min stays 0."""
    flat = image.reshape(image.shape[0], -1).float()
    lo = flat.amin(1).view(-1, 1, 1)
    hi = flat.amax(1).view(-1, 1, 1)
    span = hi - lo
    return torch.where(span > 0, (image - lo) / span.clamp_min(1e-12), torch.zeros_like(image))


def normalize_image(image: torch.Tensor, method: str) -> torch.Tensor:
    """Dispatch by name; `method` is one of NORMALIZATIONS."""
    check_normalization(method, "normalize_image")
    return _METHODS[method](image)


def load_channel_stats(path: Path, owner: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset mean and std per channel, [C, 1, 1] float32 each, from the JSON `dinocell mean-std` writes
    ({"mean": [...], "std": [...]}); the dataset checks C against the channels it gives."""
    try:
        values = json.loads(Path(path).read_text())
        mean, std = (torch.tensor(values[k], dtype=torch.float32).view(-1, 1, 1) for k in ("mean", "std"))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(
            f"{owner}: stats '{path}' is not a readable statistics file ({type(error).__name__}: {error}); expected "
            'JSON {"mean": [...], "std": [...]} as written by `dinocell mean-std`'
        ) from None
    if mean.shape != std.shape or not bool((std > 0).all()):
        raise DatasetError(f"{owner}: stats '{path}' needs as many means as stds and every std > 0, got {values}")
    return mean, std


_METHODS = {
    "percentile": percentile_normalize,
    "zscore": zscore_normalize,
    "minmax": minmax_normalize,
    "none": lambda image: image.float(),
}


def _subsample(flat: torch.Tensor, max_values: int = 1 << 16) -> torch.Tensor:
    """A fixed strided subset of each row, so statistics of big fields cost the same as those of small ones."""
    n = flat.shape[1]
    if n <= max_values:
        return flat
    step = n // max_values + 1
    return flat[:, ::step]
