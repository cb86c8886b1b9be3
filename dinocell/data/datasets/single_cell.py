"""scDINO single-cell folders: one multi-channel TIFF per cell crop, class = folder name.

Layout `root/<class>/<image>.tif[f]` (or the class folder `label_depth` levels above the image's folder). TIFFs are
channel-last [H, W, C] or channel-first [C, H, W]; the channel axis is the smaller end axis (ties: channel-first).
Channels are picked by index. Each image is min-max normalised per channel to [0, 1] (scDINO's first step); with
`stats=stats.json` (from `dinocell mean-std`) the dataset mean/std per selected channel is then applied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dinocell.data.dataset import DatasetError, SampleDataset
from dinocell.data.io.bad_files import BadFileError, BadSampleTracker
from dinocell.data.io.tiff import decode_tiff
from dinocell.data.normalize import load_channel_stats, minmax_normalize
from dinocell.data.registry import register_dataset

EXTENSIONS = (".tif", ".tiff")


def channels_first(array: np.ndarray) -> np.ndarray:
    """[H, W] -> [1, H, W]; [H, W, C] or [C, H, W] -> [C, H, W] (channel axis = the smaller end axis)."""
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D image, got shape {array.shape}")
    return np.moveaxis(array, -1, 0) if array.shape[-1] < array.shape[0] else array


@register_dataset("SingleCellFolder", "scDINO")
class SingleCellFolder(SampleDataset):
    """scDINO layout: root/<class>/<cell>.tif, multi-channel crops, per-channel min-max then dataset mean/std."""

    def __init__(
        self,
        *,
        root: Path,
        channels: list[int] | None = None,
        label_depth: int = 0,
        stats: Path | None = None,
        transform=None,
    ) -> None:
        """channels: channel indices to keep (default all). label_depth: 0 = the image's folder is its class,
        1 = the folder above, ... stats: JSON {"mean": [...], "std": [...]} over the selected channels."""
        self.root, self.channels, self.transform = Path(root), channels, transform
        if label_depth < 0:
            raise DatasetError(f"SingleCellFolder: label_depth={label_depth} must be >= 0 (0 = the image's own folder)")
        if not self.root.is_dir():
            raise FileNotFoundError(f"SingleCellFolder: root '{self.root}' is not a directory")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not self.files:
            raise FileNotFoundError(f"SingleCellFolder: no {'/'.join(EXTENSIONS)} files under '{self.root}'")
        names = [self._class_name(p, label_depth) for p in self.files]
        self.classes = sorted(set(names))
        self.labels = [self.classes.index(n) for n in names]
        self.mean = self.std = None
        if stats is not None:
            self.mean, self.std = load_channel_stats(stats, "SingleCellFolder")
            expected = len(channels) if channels else None
            if expected is not None and len(self.mean) != expected:
                raise DatasetError(
                    f"SingleCellFolder: stats '{stats}' has {len(self.mean)} channels, but channels={channels} selects "
                    f"{expected}; recompute it with `dinocell mean-std` on the same channels"
                )
        self._tracker = BadSampleTracker(len(self.files))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        found, image = self._tracker.first_good(index, self._load)
        name = self.files[found].relative_to(self.root).as_posix()
        sample = {"image": image, "label": self.labels[found], "id": name}
        if found != index:
            sample["meta"] = self._tracker.substitute_meta(index, self.files[index].relative_to(self.root).as_posix())
        return self.transform(sample) if self.transform is not None else sample

    def bad_sample_counts(self) -> dict[str, int]:
        """Distinct unreadable files found so far (all DataLoader workers of this process), by reason."""
        return self._tracker.counts()

    def _class_name(self, path: Path, label_depth: int) -> str:
        folder = path.parents[label_depth] if label_depth < len(path.parents) else None
        if folder is None or folder == self.root or self.root not in folder.parents:
            raise DatasetError(
                f"SingleCellFolder: '{path}' has no class folder {label_depth} level(s) above its own folder inside "
                f"'{self.root}' (expected root/<class>/.../<image>; try a smaller label_depth)"
            )
        return folder.name

    def _load(self, index: int) -> torch.Tensor:
        path = self.files[index]
        name = str(path)
        try:
            array = channels_first(decode_tiff(path.read_bytes(), name))
        except ValueError as error:  # neither 2-D nor 3-D
            raise BadFileError("bad_shape", name, str(error)) from error
        except OSError as error:
            raise BadFileError("unreachable", name, f"{type(error).__name__}: {error}") from error
        if self.channels is not None:
            if max(self.channels) >= array.shape[0]:  # one odd file is skipped; a wrong `channels` fails every file
                raise BadFileError(
                    "bad_shape", name, f"channels={self.channels} but the file has {array.shape[0]} channels "
                    f"(valid indices 0..{array.shape[0] - 1})",
                )  # fmt: skip
            array = array[self.channels]
        image = minmax_normalize(torch.from_numpy(array.astype(np.float32)))
        if self.mean is not None:
            if len(self.mean) != image.shape[0]:
                raise BadFileError("bad_shape", name, f"{image.shape[0]} channels, stats have {len(self.mean)}")
            image = (image - self.mean) / self.std
        return image
