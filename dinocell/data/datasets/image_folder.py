"""ImageFolder: class sub-folders of ordinary image files (PNG, JPEG, TIFF, ...) for natural-image users.

Layout `root/<class name>/**/<image>`; the class is the top-level folder name (classes sorted by name). Images placed
directly in `root` (no class folders at all) form an unlabelled set (label -1). Values are scaled by the file's bit
depth to [0, 1] float32 (8-bit / 255, 16-bit / 65535, so 16-bit PNG and TIFF keep full precision); float TIFFs are
kept as stored. TIFFs are read with tifffile (multi-channel 16-bit TIFFs are beyond PIL), everything else with PIL.

Unreadable files never stop a run: a file that fails to decode is replaced by the next readable file in order, counted
(`bad_sample_counts()`, shared by all DataLoader workers) and warned about once with its path.
"""

from __future__ import annotations

import pathlib
from typing import Literal

import numpy as np
import tifffile
import torch
from PIL import Image

from dinocell.data.dataset import DatasetError, SampleDataset
from dinocell.data.io.bad_files import BadFileError, BadSampleTracker
from dinocell.data.io.folders import files_by_class
from dinocell.data.registry import register_dataset

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL's RGB -> L


@register_dataset("ImageFolder")
class ImageFolder(SampleDataset):
    """Class sub-folders of RGB or greyscale image files, values scaled to [0, 1] by bit depth."""

    def __init__(self, *, root: pathlib.Path, channels: Literal[1, 3] = 3, transform=None) -> None:
        self.root, self.channels, self.transform = pathlib.Path(root), channels, transform
        if channels not in (1, 3):
            raise DatasetError(f"ImageFolder: channels={channels} must be 1 or 3")
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: root '{self.root}' is not a directory")
        self.classes, self.samples = files_by_class(self.root, EXTENSIONS)
        if not self.samples:
            raise FileNotFoundError(
                f"ImageFolder: no images ({', '.join(EXTENSIONS)}) under '{self.root}' (expected root/<class>/<image>)"
            )
        self._tracker = BadSampleTracker(len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        found, image = self._tracker.first_good(index, self._load_index)
        path, label = self.samples[found]
        sample = {"image": image, "label": label, "id": path.relative_to(self.root).as_posix()}
        if found != index:
            wanted = self.samples[index][0].relative_to(self.root).as_posix()
            sample["meta"] = self._tracker.substitute_meta(index, wanted)
        return self.transform(sample) if self.transform is not None else sample

    def bad_sample_counts(self) -> dict[str, int]:
        """Distinct undecodable files found so far (all DataLoader workers of this process), plus `total`."""
        return self._tracker.counts()

    def _load_index(self, index: int) -> torch.Tensor:
        path = self.samples[index][0]
        try:
            return self._load(path)
        except Exception as err:  # any decoder error: counted and replaced, never a crash of the run
            raise BadFileError("undecodable", str(path), f"{type(err).__name__}: {err}") from err

    def _load(self, path: pathlib.Path) -> torch.Tensor:
        if path.suffix.lower() in (".tif", ".tiff"):
            return pixels_to_tensor(tifffile.imread(path), self.channels)
        with Image.open(path) as img:
            return pixels_to_tensor(pil_pixels(img), self.channels)


def pixels_to_tensor(array: np.ndarray, channels: int) -> torch.Tensor:
    """H x W or H x W x (1-4) pixels -> float32 [channels, H, W] in [0, 1] by bit depth (alpha dropped, grey
    replicated to RGB or RGB reduced to luma as `channels` asks)."""
    array = _to_unit_range(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected H x W or H x W x (1-4) pixels, got shape {array.shape}")
    colour = array[:, :, :3] if array.shape[2] >= 3 else array[:, :, :1]  # drop alpha
    if channels == 1 and colour.shape[2] == 3:
        colour = colour @ _LUMA[:, None]
    elif channels == 3 and colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(colour.transpose(2, 0, 1)))


def pil_pixels(img: Image.Image) -> np.ndarray:
    """The pixels of a PIL image at their bit depth (palette and exotic modes converted to RGB(A))."""
    img.load()
    if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
        img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    array = np.asarray(img)
    if img.mode == "I" and array.size and array.max() <= 65535 and array.min() >= 0:
        array = array.astype(np.uint16)  # PIL widens 16-bit PNGs to 32-bit "I"
    return array


def _to_unit_range(array: np.ndarray) -> np.ndarray:
    """Scale by bit depth (any byte order): 8-bit / 255, 16-bit / 65535; floats as stored."""
    if array.dtype.kind == "u" and array.dtype.itemsize in (1, 2):
        return array.astype(np.float32) / (255.0 if array.dtype.itemsize == 1 else 65535.0)
    if array.dtype == bool or array.dtype.kind == "f":
        return array.astype(np.float32)
    raise ValueError(f"unsupported pixel type {array.dtype} (expected uint8, uint16 or float)")
