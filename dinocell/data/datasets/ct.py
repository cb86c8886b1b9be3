"""CT slabs from NPZ files (the DINOv2-CT seed format): HU-windowed slices plus their lung-mask slices as channels.

Each `*.npz` under `npz_dir_path` holds `array` (CT slices in Hounsfield units) and `mask` (lung mask, same shape),
slices first ([S, H, W]) or last ([H, W, S]); the slice axis is the smaller end axis. `patch_size=H,W,C` describes
the sample: C/2 consecutive slices (the central ones when a file has more) become image channels, their C/2 mask
slices the remaining channels; larger images are centre-cropped to H x W. HU values are clipped to `hu_window` and
mapped to [eps, 1-eps], so a real pixel is never exactly 0 and the zeros of a masked crop stay distinguishable.
The sample's "mask" (for masked local crops) is the union of the slab's mask slices: a pixel that is lung in any
slice the model sees is kept. Files that fail to load or have the wrong shape are counted and skipped.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from dinocell.data.dataset import DatasetError, SampleDataset
from dinocell.data.io.bad_files import BadFileError, BadSampleTracker
from dinocell.data.registry import register_dataset


def hu_to_unit(hu: np.ndarray, window: tuple[float, float], eps: float) -> np.ndarray:
    """Clip Hounsfield units to `window` and map it linearly onto [eps, 1 - eps]."""
    low, high = window
    return eps + (np.clip(hu.astype(np.float32), low, high) - low) / (high - low) * (1.0 - 2.0 * eps)


@register_dataset("CTDataset")
class CTDataset(SampleDataset):
    """CT NPZ slabs: C/2 HU-windowed slices + C/2 lung-mask slices as channels, with the lung mask as sample mask."""

    def __init__(
        self,
        *,
        npz_dir_path: Path,
        patch_size: tuple[int, int, int] = (512, 512, 6),
        hu_window: tuple[float, float] = (-1000.0, 150.0),
        eps: float = 1e-3,
        transform=None,
    ) -> None:
        """npz_dir_path: folder searched recursively for *.npz. patch_size: H,W,C with C even (slices + masks)."""
        height, width, channels = patch_size
        if channels < 2 or channels % 2:
            raise DatasetError(f"CTDataset: patch_size channels={channels} must be even (slices + mask slices), e.g. 6")
        if not hu_window[0] < hu_window[1]:
            raise DatasetError(f"CTDataset: hu_window={hu_window} must be (low, high) with low < high, e.g. -1000,150")
        if not 0.0 <= eps < 0.5:
            raise DatasetError(f"CTDataset: eps={eps} must be in [0, 0.5), e.g. 0.001")
        self.root = Path(npz_dir_path)
        self.size, self.n_slices = (height, width), channels // 2
        self.hu_window, self.eps, self.transform = hu_window, eps, transform
        self.files = sorted(self.root.rglob("*.npz"))
        if not self.files:
            raise FileNotFoundError(f"CTDataset: no .npz files under '{self.root}'")
        self._tracker = BadSampleTracker(len(self.files))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        found, (image, mask) = self._tracker.first_good(index, self._load)
        sample = {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(mask),
            "label": -1,
            "id": self.files[found].relative_to(self.root).as_posix(),
        }
        if found != index:
            sample["meta"] = self._tracker.substitute_meta(index, self.files[index].relative_to(self.root).as_posix())
        return self.transform(sample) if self.transform is not None else sample

    def bad_sample_counts(self) -> dict[str, int]:
        """Distinct unreadable files found so far (all DataLoader workers of this process), by reason."""
        return self._tracker.counts()

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        path = self.files[index]
        name = path.relative_to(self.root).as_posix()
        try:
            with np.load(path, allow_pickle=False) as npz:
                hu, lung = npz["array"], npz["mask"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise BadFileError("undecodable", name, f"{type(error).__name__}: {error}") from error
        if hu.shape != lung.shape or hu.ndim != 3:
            raise BadFileError("bad_shape", name, f"array {hu.shape} and mask {lung.shape} must be equal and 3-D")
        if hu.shape[0] > hu.shape[-1]:  # slices last
            hu, lung = np.moveaxis(hu, -1, 0), np.moveaxis(lung, -1, 0)
        hu, lung = self._slab(hu, name), self._slab(lung, name)
        image = np.concatenate([hu_to_unit(hu, self.hu_window, self.eps), (lung > 0).astype(np.float32)])
        return np.ascontiguousarray(image), np.ascontiguousarray((lung > 0).any(0, keepdims=True))

    def _slab(self, volume: np.ndarray, name: str) -> np.ndarray:
        """The central n_slices slices, centre-cropped to the patch height and width."""
        depth, height, width = volume.shape
        (h, w), k = self.size, self.n_slices
        if depth < k or height < h or width < w:
            raise BadFileError("bad_shape", name, f"slices x H x W = {volume.shape}, need at least {(k, h, w)}")
        z, y, x = (depth - k) // 2, (height - h) // 2, (width - w) // 2
        return volume[z : z + k, y : y + h, x : x + w]
