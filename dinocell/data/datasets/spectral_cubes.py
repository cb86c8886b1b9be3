"""SpectralCubes: multispectral and hyperspectral band cubes (TIFF, NPY/NPZ, ENVI), one cube per file.

Layout `root/<class>/**/<cube>` (class = top-level folder) or cubes directly in `root` (unlabelled). Per sample: the
cube is read as [bands, H, W] (dinocell.data.io.cubes), the selected bands are taken (`bands=0-99,120,200-407`), groups
of `bin_size` adjacent selected bands are averaged, each band is normalised per image (`normalization`), then
standardised with the dataset mean/std of `stats=` (from `dinocell mean-std`). RGB + UV multispectral images are the
4-band case. The first good file is read when the dataset is built, to check the keys against its band count; a later
file with another band count, or one that cannot be read, is counted and skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dinocell.data.dataset import DatasetError, SampleDataset
from dinocell.data.io.bad_files import BadFileError, BadSampleTracker
from dinocell.data.io.cubes import CUBE_SUFFIXES, BandAxis, open_cube, require_spectral
from dinocell.data.io.folders import files_by_class
from dinocell.data.normalize import Normalization, check_normalization, load_channel_stats, normalize_image
from dinocell.data.registry import register_dataset


def parse_band_ranges(items: list[str]) -> list[int]:
    """Band indices from items "i" or "a-b" (inclusive, a <= b), in the order given; a band may appear once."""
    indices: list[int] = []
    for item in items:
        low, sep, high = item.partition("-")
        try:
            first, last = int(low), int(high if sep else low)
        except ValueError:
            first = last = -1
        if first < 0 or last < first:
            raise ValueError(f"bands item {item!r} is not a band index or an ascending range a-b (e.g. 0-99)")
        indices.extend(range(first, last + 1))
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise ValueError(f"bands selects band(s) {repeated} more than once")
    return indices


def bin_bands(cube: np.ndarray, bin_size: int) -> np.ndarray:
    """Average each group of `bin_size` consecutive bands of a [B, H, W] cube (B divisible by bin_size)."""
    if bin_size == 1:
        return cube
    return cube.reshape(cube.shape[0] // bin_size, bin_size, *cube.shape[1:]).mean(axis=1, dtype=np.float32)


@register_dataset("SpectralCubes")
class SpectralCubes(SampleDataset):
    """Multi/hyperspectral band cubes (TIFF, NPY/NPZ, ENVI), band selection and binning, per-band normalisation."""

    def __init__(
        self,
        *,
        root: Path,
        bands: list[str] | None = None,
        bin_size: int = 1,
        band_axis: BandAxis = "auto",
        npz_key: str | None = None,
        normalization: Normalization = "percentile",
        stats: Path | None = None,
        transform=None,
    ) -> None:
        """bands: indices and inclusive ranges, e.g. 0-99,120 (default all). bin_size: average groups of this many
        adjacent selected bands. band_axis: auto|first|last for NPY/NPZ/TIFF. npz_key: array name in NPZ files.
        normalization: per image and band. stats: JSON {"mean": [...], "std": [...]} over the output bands."""
        self.root, self.transform = Path(root), transform
        self.band_axis, self.npz_key, self.bin_size, self.normalization = band_axis, npz_key, bin_size, normalization
        check_normalization(normalization, "SpectralCubes")
        if band_axis not in ("auto", "first", "last"):
            raise DatasetError(f"SpectralCubes: band_axis={band_axis!r} must be auto, first or last")
        if bin_size < 1:
            raise DatasetError(f"SpectralCubes: bin_size={bin_size} must be >= 1 (1 = no binning)")
        if not self.root.is_dir():
            raise FileNotFoundError(f"SpectralCubes: root '{self.root}' is not a directory")
        self.classes, self.samples = files_by_class(self.root, CUBE_SUFFIXES)
        if not self.samples:
            raise FileNotFoundError(
                f"SpectralCubes: no cubes ({', '.join(CUBE_SUFFIXES)}) under '{self.root}' "
                f"(expected root/<class>/<cube> or root/<cube>)"
            )
        if any(path.suffix.lower() == ".hdr" for path, _ in self.samples):
            require_spectral()
        self._tracker = BadSampleTracker(len(self.samples))
        self.n_bands: int = self._tracker.first_good(0, lambda i: open_cube(*self._where(i)).shape[0])[1]
        try:
            self.band_indices = parse_band_ranges(bands) if bands is not None else list(range(self.n_bands))
        except ValueError as error:
            raise DatasetError(f"SpectralCubes: {error}") from None
        if not self.band_indices:
            raise DatasetError("SpectralCubes: bands= is empty; give band indices or ranges, e.g. bands=0-99,120")
        if max(self.band_indices) >= self.n_bands:
            raise DatasetError(
                f"SpectralCubes: bands={','.join(bands or [])} selects bands outside the cubes' {self.n_bands} bands "
                f"(valid indices 0-{self.n_bands - 1})"
            )
        selected = len(self.band_indices)
        if selected % bin_size:
            divisors = [k for k in range(1, selected + 1) if selected % k == 0]
            fitting = selected // bin_size * bin_size
            raise DatasetError(
                f"SpectralCubes: bin_size={bin_size} does not divide the {selected} selected bands; choose bin_size "
                f"among {divisors} or select a multiple of {bin_size} bands"
                + (f" (e.g. bands=0-{fitting - 1})" if fitting and bands is None else "")
            )
        self.n_channels = selected // bin_size  # what the model sees
        self.mean = self.std = None
        if stats is not None:
            self.mean, self.std = load_channel_stats(stats, "SpectralCubes")
            if len(self.mean) != self.n_channels:
                raise DatasetError(
                    f"SpectralCubes: stats '{stats}' has {len(self.mean)} channels, but the dataset gives "
                    f"{self.n_channels} (after bands= and bin_size=); recompute it with `dinocell mean-std` on the "
                    f"same dataset string without stats="
                )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        found, image = self._tracker.first_good(index, self._load)
        path, label = self.samples[found]
        sample = {"image": image, "label": label, "id": path.relative_to(self.root).as_posix()}
        return self.transform(sample) if self.transform is not None else sample

    def bad_sample_counts(self) -> dict[str, int]:
        """Distinct unreadable files found so far (all DataLoader workers of this process), by reason."""
        return self._tracker.counts()

    def _where(self, index: int) -> tuple[Path, str, BandAxis, str | None]:
        path = self.samples[index][0]
        return path, path.relative_to(self.root).as_posix(), self.band_axis, self.npz_key

    def _load(self, index: int) -> torch.Tensor:
        where = self._where(index)
        key = where[1]
        cube = open_cube(*where)
        if cube.shape[0] != self.n_bands:
            raise BadFileError("bad_shape", key, f"{cube.shape[0]} bands, the dataset's cubes have {self.n_bands}")
        try:
            selected = np.asarray(cube[self.band_indices], dtype=np.float32)  # reads only these bands of a memmap
        except (OSError, ValueError) as error:
            raise BadFileError("undecodable", key, f"{type(error).__name__}: {error}") from error
        if not selected.any():
            raise BadFileError("zero_filled", key, "all selected bands are 0")
        image = normalize_image(torch.from_numpy(bin_bands(selected, self.bin_size)), self.normalization)
        if self.mean is not None:
            image = (image - self.mean) / self.std
        return image
