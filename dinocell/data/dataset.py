"""What every dataset is: the sample record it returns and the optional hooks the rest of dinocell may use.

A dataset returns raw-ish float tensors and metadata; all augmentation lives in the crop pipeline. Registered
datasets subclass `SampleDataset`, whose defaults describe a plain map-style dataset, so the pipeline and the
evaluation tools call the hooks directly instead of probing for them.
"""

from __future__ import annotations

from typing import Any, TypedDict

import torch
from torch.utils.data import Dataset

from dinocell.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset that cannot be built or read as configured: a bad key value, an empty or missing location, files
    that do not match the keys. Raised by the dataset families; the message names the dataset, the value and the fix."""


class _RequiredSampleKeys(TypedDict):
    image: torch.Tensor  # float32 [C, H, W]; the dataset's own normalisation applied, no augmentation
    label: int  # class index into `classes`, -1 when unlabelled
    id: str  # stable identifier (file path, field key) for logs and feature exports


class Sample(_RequiredSampleKeys, total=False):
    """One sample as a dataset returns it."""

    mask: torch.Tensor  # bool [1, H, W] region of interest (CT lung mask), for masked crops
    meta: dict[str, Any]  # anything else worth keeping with the sample (plate, well, site, ...)


class SampleDataset(Dataset):
    """Base class of registered datasets: `__len__` and `__getitem__(index) -> Sample`, plus optional hooks."""

    #: Class names of the labels, or None for an unlabelled dataset.
    classes: list[str] | None = None
    #: k > 1: the k consecutive indices of a block share one expensive read (JUMP `crops_per_field`); the sampler
    #: then keeps each block in one rank's batch so the read happens once.
    sample_block_size: int = 1

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        raise NotImplementedError

    def __getitems__(self, indices: list[int]) -> list[Sample]:
        """A whole batch; datasets that can fetch many samples concurrently (S3) override this."""
        return [self[i] for i in indices]

    def bad_sample_counts(self) -> dict[str, int] | None:
        """Bad files skipped so far (`{"total": n, ...}`, over all DataLoader workers), or None if not counted."""
        return None
