"""Loose image files (TIFF, PNG/JPEG, NPZ) as a small dataset, for looking at a few images without a dataset string.

Each file becomes one float32 [C, H, W] sample, min-max scaled per channel to [0, 1] (scDINO's first step; the
config's crops.channel_mean/std are applied afterwards by the eval transform). TIFFs may be [H, W], [H, W, C] or
[C, H, W] (the channel axis is the smaller end axis); PNG/JPEG are read as grey or RGB (alpha dropped); an NPZ holds
its image under `image` or `array` (the DINOv2-CT seed format), or as its only array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from dinocell.data.dataset import SampleDataset
from dinocell.data.datasets.single_cell import channels_first
from dinocell.data.normalize import minmax_normalize
from dinocell.eval.errors import EvalError

SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npz")
NPZ_KEYS = ("image", "array")


def read_image_file(path: Path) -> np.ndarray:
    """The pixels of one file as [C, H, W] in the file's own dtype."""
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return channels_first(tifffile.imread(path))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            key = next((k for k in NPZ_KEYS if k in npz.files), npz.files[0] if len(npz.files) == 1 else None)
            if key is None:
                raise EvalError(f"{path}: NPZ arrays {npz.files}; expected one named {' or '.join(NPZ_KEYS)}")
            return channels_first(npz[key])
    with Image.open(path) as image:
        if image.mode not in ("L", "I", "I;16", "F", "RGB"):
            image = image.convert("RGB")
        return channels_first(np.asarray(image))


class ImageFiles(SampleDataset):
    """Samples {"image", "label": -1, "id": file name} from a list of files, in the order given."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        for path in self.paths:
            if not path.is_file():
                raise FileNotFoundError(f"image file {path} does not exist")
            if path.suffix.lower() not in SUFFIXES:
                raise EvalError(
                    f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}"
                )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        image = minmax_normalize(torch.from_numpy(read_image_file(path).astype(np.float32)))
        return {"image": image, "label": -1, "id": path.name}
