"""Hugging Face `datasets` collections (Food-101, CIFAR-10, ImageNet subsets, ...) as a dataset family.

Two sources, neither of which touches the network:
- `name=` a hub name (e.g. `uoft-cs/cifar10`): resolved from the local `datasets` cache only, i.e. a dataset that
  `datasets.load_dataset(name)` has prepared once on a machine with network (HF_DATASETS_CACHE, or `cache_dir=`);
- `root=` a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`.
`split` picks the split (hub caches also accept slices such as `train[:10%]`). Each row gives the `image_column`
(a PIL image or an array) as float32 [channels, H, W] scaled to [0, 1] by bit depth, exactly as ImageFolder does,
and the `label_column` (a ClassLabel gives the class names; none = unlabelled). A row whose image does not decode is
counted and replaced by the next good row (marked as a substitute, so evaluation skips it).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from dinocell.data.dataset import DatasetError, SampleDataset
from dinocell.data.datasets.image_folder import pil_pixels, pixels_to_tensor
from dinocell.data.io.bad_files import BadFileError, BadSampleTracker
from dinocell.data.registry import register_dataset
from dinocell.errors import MissingDependencyError


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(
            "HuggingFace datasets need the `datasets` package: pip install datasets (or pip install 'dinocell[hf]')"
        ) from None
    return datasets


def _from_cache(name: str, config: str | None, split: str, cache_dir: Path | None) -> Any:
    """A hub dataset's split from the local `datasets` cache, never from the network."""
    datasets = _import_datasets()
    from datasets.packaged_modules.cache.cache import Cache

    where = cache_dir or datasets.config.HF_DATASETS_CACHE
    try:
        builder = Cache(cache_dir=str(where), dataset_name=name.split("/")[-1], repo_id=name, config_name=config,
                        hash="auto", version="auto")
        return builder.as_dataset(split=split)
    except (ValueError, FileNotFoundError) as error:
        raise FileNotFoundError(
            f"HuggingFace: '{name}' (config {config or 'any'}, split '{split}') is not in the local datasets cache "
            f"{where} ({str(error).splitlines()[0]}); prepare it once where a network is available with "
            f"`python -c \"import datasets; datasets.load_dataset('{name}')\"` (same HF_DATASETS_CACHE), or pass "
            "root= a folder written by save_to_disk"
        ) from None


def _from_disk(root: Path, split: str) -> Any:
    datasets = _import_datasets()
    if not root.is_dir():
        raise FileNotFoundError(f"HuggingFace: root '{root}' is not a directory (expected a save_to_disk folder)")
    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            close = difflib.get_close_matches(split, list(loaded), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise DatasetError(f"HuggingFace: '{root}' has no split '{split}'.{hint} Its splits: {', '.join(loaded)}")
        return loaded[split]
    return loaded  # a single saved Dataset is its own split


def _column(table: Any, column: str, key: str) -> str:
    if column not in table.column_names:
        close = difflib.get_close_matches(column, table.column_names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise DatasetError(
            f"HuggingFace: {key}='{column}' is not a column.{hint} Columns: {', '.join(table.column_names)}"
        )
    return column


@register_dataset("HuggingFace", "HFDataset")
class HuggingFaceDataset(SampleDataset):
    """A Hugging Face `datasets` split (hub name from the local cache, or a save_to_disk folder): image + label."""

    def __init__(
        self,
        *,
        name: str | None = None,
        root: Path | None = None,
        config: str | None = None,
        split: str = "train",
        image_column: str = "image",
        label_column: str | None = "label",
        channels: Literal[1, 3] = 3,
        cache_dir: Path | None = None,
        transform=None,
    ) -> None:
        """name: hub name (local cache only) or root: save_to_disk folder, one of the two. config: the hub
        configuration (default: the only cached one). label_column: none for unlabelled data."""
        if (name is None) == (root is None):
            raise DatasetError("HuggingFace: give exactly one of name= (a hub name in the local cache) or root= "
                             "(a save_to_disk folder)")
        if channels not in (1, 3):
            raise DatasetError(f"HuggingFace: channels={channels} must be 1 or 3")
        table = _from_cache(name, config, split, cache_dir) if name is not None else _from_disk(Path(root), split)
        self.source = name or str(root)
        self.split, self.channels, self.transform = split, channels, transform
        self.image_column = _column(table, image_column, "image_column")
        self.label_column = None if label_column is None else _column(table, label_column, "label_column")
        feature = table.features.get(self.label_column) if self.label_column else None
        self.classes: list[str] | None = list(feature.names) if hasattr(feature, "names") else None
        self._label_index: dict[Any, int] | None = None
        if self.label_column and self.classes is None:
            values = table.unique(self.label_column)
            if not all(isinstance(v, (int, np.integer)) for v in values):  # string labels: classes sorted by name
                self.classes = sorted(str(v) for v in values)
                self._label_index = {v: self.classes.index(str(v)) for v in values}
        self.table = table
        self._tracker = BadSampleTracker(len(table))

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        found, (image, label) = self._tracker.first_good(index, self._load)
        sample = {"image": image, "label": label, "id": self._id(found)}
        if found != index:
            sample["meta"] = self._tracker.substitute_meta(index, self._id(index))
        return self.transform(sample) if self.transform is not None else sample

    def bad_sample_counts(self) -> dict[str, int]:
        """Distinct rows whose image did not decode (all DataLoader workers of this process), plus `total`."""
        return self._tracker.counts()

    def _id(self, index: int) -> str:
        return f"{self.source}/{self.split}/{index}"

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            row = self.table[index]
            value = row[self.image_column]
            pixels = pil_pixels(value) if isinstance(value, Image.Image) else np.asarray(value)
            image = pixels_to_tensor(pixels, self.channels)
        except Exception as err:  # any decoder error: counted and replaced, never a crash of the run
            raise BadFileError("undecodable", self._id(index), f"{type(err).__name__}: {err}") from err
        if self.label_column is None:
            return image, -1
        label = row[self.label_column]
        return image, self._label_index[label] if self._label_index is not None else int(label)
