"""SyntheticHyperspectral: procedural band cubes of objects on a background, classes by spectral signature and shape.

Each field is a jittered grid of separate objects (plant- or cell-like blobs) on a soil-like background, rendered as a
linear mixture: a pixel's reflectance is abundance x object spectrum + (1 - abundance) x background spectrum, lit by
a per-field illuminant and recorded by a sensor (gain, dark offset, shot and read noise) as uint16 [bands, H, W].
Bands are `n_bands` wavelengths evenly spaced over `wavelength_range` (nm); 4 bands over 365-650 nm are UV, blue,
green and red, an RGB + UV multispectral camera.

A class fixes four attributes, each at one of K evenly spaced levels, every class at a different level of every
attribute (the first four columns of SyntheticCellPainting's phenotype table):
- red_edge: where the object's reflectance rises from its low visible level to its near-infrared plateau, 680-760 nm;
- absorption: centre of an absorption band of the object (60% deep, ~50 nm wide), 450-950 nm;
- elongation: aspect ratio of the objects, 1 to 2 (same area);
- lobes: amplitude of five boundary lobes, from round (0) to star-shaped (0.3).
So the spectrum alone and the shape alone each separate the classes. Nuisances per field: illuminant level and
spectral tilt, background spectrum, object density, size, position and rotation, per-object cover and small jitter of
the spectral features, sensor gain, offset and noise. Deterministic in (seed, split, index).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from dinocell.data.dataset import DatasetError, SampleDataset
from dinocell.data.datasets.synthetic import phenotype_table
from dinocell.data.normalize import Normalization, check_normalization, normalize_image
from dinocell.data.registry import register_dataset

ATTRIBUTES = ("red_edge", "absorption", "elongation", "lobes")
_SPLIT_CODES = {"train": 0, "test": 1}
_LOBES = 5
MAX_ELONGATION, MAX_LOBES = 1.0, 0.3  # aspect ratio 1 to 2, lobe amplitude 0 to 0.3


@register_dataset("SyntheticHyperspectral")
class SyntheticHyperspectral(SampleDataset):
    """Procedural hyperspectral cubes (any band count): K classes by spectral signature and object shape."""

    def __init__(
        self,
        *,
        size: int = 10000,
        image_size: int = 64,
        n_bands: int = 32,
        wavelength_range: tuple[float, float] = (400.0, 1000.0),
        n_classes: int = 4,
        seed: int = 0,
        split: Literal["train", "test"] = "train",
        object_radius: float = 5.0,
        normalization: Normalization = "percentile",
        transform=None,
    ) -> None:
        for key, value in (("size", size), ("image_size", image_size), ("n_bands", n_bands), ("n_classes", n_classes)):
            if value < 1:
                raise DatasetError(f"SyntheticHyperspectral: {key}={value} must be >= 1")
        if not 0 < wavelength_range[0] <= wavelength_range[1]:
            raise DatasetError(
                f"SyntheticHyperspectral: wavelength_range={wavelength_range} must be low,high in nm with "
                f"0 < low <= high, e.g. 400,1000"
            )
        if not 2.0 <= object_radius <= image_size:
            raise DatasetError(f"SyntheticHyperspectral: object_radius={object_radius} must lie in [2, image_size]")
        if split not in _SPLIT_CODES:
            raise DatasetError(f"SyntheticHyperspectral: split='{split}' must be one of {', '.join(_SPLIT_CODES)}")
        check_normalization(normalization, "SyntheticHyperspectral")
        self.size, self.image_size, self.seed, self.split = size, image_size, seed, split
        self.object_radius, self.normalization, self.transform = object_radius, normalization, transform
        self.wavelengths = np.linspace(*wavelength_range, n_bands).astype(np.float32)
        self.classes = [f"class_{k}" for k in range(n_classes)]
        self._attributes = phenotype_table(n_classes)[:, : len(ATTRIBUTES)]

    def __len__(self) -> int:
        return self.size

    def label_of(self, index: int) -> int:
        """Classes cycle with the index, so every contiguous range of samples is balanced."""
        return index % len(self.classes)

    def render_cube(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw uint16 cube [bands, H, W] of sample `index` and its object abundance map [H, W] in [0, 1]."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for SyntheticHyperspectral of size {self.size}")
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])
        attributes = dict(zip(ATTRIBUTES, self._attributes[self.label_of(index)].tolist()))
        return _render(rng, self.image_size, self.object_radius, self.wavelengths, attributes)

    def __getitem__(self, index: int) -> dict:
        raw, abundance = self.render_cube(index)
        image = normalize_image(torch.from_numpy(raw.astype(np.float32)), self.normalization)
        label = self.label_of(index)
        sample = {
            "image": image,
            "label": label,
            "id": f"synthetic-hyperspectral/{self.split}/seed{self.seed}/{index}",
            "meta": {"class_name": self.classes[label], "split": self.split, "index": index,
                     "object_cover": float(abundance.mean())},
        }
        return self.transform(sample) if self.transform is not None else sample


def object_reflectance(wavelengths: np.ndarray, red_edge: np.ndarray, absorption: np.ndarray) -> np.ndarray:
    """[n, B] reflectance of n objects: low in the visible, a sigmoid rise at `red_edge` (nm) to a near-infrared
    plateau, times an absorption band centred at `absorption` (nm)."""
    lam = wavelengths[None, :]
    rise = 1.0 / (1.0 + np.exp(-(lam - red_edge[:, None]) / 12.0))
    dip = 1.0 - 0.6 * np.exp(-np.square((lam - absorption[:, None]) / 30.0))
    return ((0.06 + 0.44 * rise) * dip).astype(np.float32)


def _object_centres(rng: np.random.Generator, size: int, reach: float) -> np.ndarray:
    """[n, 2] (y, x) centres on a randomly shifted, jittered and thinned square grid, at least one inside the field.
    The jitter is small enough that objects of radius `reach` never touch (3 px apart at least), so each object
    stays one connected region."""
    jitter = 0.15 * reach
    spacing = 2.0 * reach + 3.0 + 2.0 * jitter
    n = int(size / spacing) + 2
    grid = (np.arange(n) - 0.5) * spacing
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    centres = np.stack([gy.ravel(), gx.ravel()], axis=1) + rng.uniform(0.0, spacing, 2)
    centres += rng.uniform(-jitter, jitter, centres.shape)
    keep = rng.random(len(centres)) < rng.uniform(0.6, 1.0)
    keep[np.argmin(np.abs(centres - size / 2).max(axis=1))] = True  # the site nearest the field's centre
    return centres[keep]


def _render(
    rng: np.random.Generator, size: int, radius: float, wavelengths: np.ndarray, p: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    elongation = 1.0 + MAX_ELONGATION * p["elongation"]
    lobes = MAX_LOBES * p["lobes"]
    # farthest boundary point from a centre over all classes: the layout must not depend on the class
    reach = radius * 1.15 * math.sqrt(1.0 + MAX_ELONGATION) * (1.0 + MAX_LOBES)
    centres = _object_centres(rng, size, reach)
    n = len(centres)
    r = radius * rng.uniform(0.85, 1.15, n)
    a, b = r * math.sqrt(elongation), r / math.sqrt(elongation)
    theta, phase = rng.uniform(0, math.pi, n), rng.uniform(0, 2 * math.pi, n)
    cover = rng.uniform(0.6, 1.0, n)
    spectra = object_reflectance(
        wavelengths,
        680.0 + 80.0 * p["red_edge"] + rng.normal(0.0, 4.0, n),
        450.0 + 500.0 * p["absorption"] + rng.normal(0.0, 8.0, n),
    )
    half = int(math.ceil(reach)) + 2
    pad = 2 * half + 1  # every kept object's window fits
    abundance = np.zeros((size + 2 * pad, size + 2 * pad), np.float32)
    mixed = np.zeros((len(wavelengths), size + 2 * pad, size + 2 * pad), np.float32)
    d = np.arange(-half, half + 1, dtype=np.float32)
    for i, (cy, cx) in enumerate(centres):
        iy, ix = int(round(cy)), int(round(cx))
        if not (-half <= iy < size + half and -half <= ix < size + half):
            continue
        dy, dx = d[:, None] - (cy - iy), d[None, :] - (cx - ix)
        u = (dx * math.cos(theta[i]) + dy * math.sin(theta[i])) / a[i]
        v = (-dx * math.sin(theta[i]) + dy * math.cos(theta[i])) / b[i]
        rho = np.sqrt(u * u + v * v)
        boundary = 1.0 + lobes * np.cos(_LOBES * np.arctan2(v, u) + phase[i])
        window = np.clip((boundary - rho) * b[i] / 1.5, 0.0, 1.0) * cover[i]  # 1.5 px soft edge
        ys, xs = slice(iy + pad - half, iy + pad + half + 1), slice(ix + pad - half, ix + pad + half + 1)
        abundance[ys, xs] += window
        mixed[:, ys, xs] += spectra[i][:, None, None] * window
    abundance, mixed = abundance[pad:-pad, pad:-pad], mixed[:, pad:-pad, pad:-pad]
    lam = (wavelengths - 400.0) / 600.0
    background = (rng.uniform(0.10, 0.25) + rng.uniform(0.05, 0.25) * lam).astype(np.float32)
    reflectance = mixed + (1.0 - abundance) * background[:, None, None]
    illuminant = math.exp(rng.uniform(math.log(0.5), math.log(2.0))) * (1.0 + rng.uniform(-0.3, 0.3) * (lam - 0.5))
    signal = reflectance * (20000.0 * illuminant)[:, None, None] + rng.uniform(100.0, 300.0)
    noise = torch.randn(signal.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**62)))).numpy()
    counts = signal + noise * np.sqrt(2.0 * signal + 100.0)  # shot noise (variance ~ 2 x signal) and read noise
    return np.clip(counts, 0, 65535).astype(np.uint16), abundance
