"""SyntheticCellPainting: procedural 5-channel Cell Painting fields, the embedded default data (no download).

Each field is a jittered grid of cells rendered into DNA, ER, RNA, AGP and Mito channels (the JUMP stain order used by
sources 2, 5 and 6). A phenotype class sets nine structural attributes: cell elongation, membrane ruffling, nuclear
lobes, chromatin spots, ER coarseness, nucleoli count, actin fibres versus membrane ring, mitochondria length and their
spread from the nucleus. Each attribute has K evenly spaced levels and every class takes a different level of every
attribute, so classes differ in shape and texture (what self-supervised features can learn). Nuisances (cell density,
size, position, rotation, per-cell brightness, per-channel staining balance between diffuse and spot-like signal,
response curve, gain and background, illumination ramp, shot and read noise) are drawn per field and dominate
per-channel mean intensities, so no trivial statistic separates the classes.

Fields are deterministic in (seed, split, index) and rendered on the fly as uint16, like decoded JUMP TIFFs.

Plate layout (metadata only; images and labels do not depend on it): the phenotype class is the perturbation, and
`control_class` is the negative control (`pert_type` "negcon", the others "trt"). Sample i is field number
(i // n_classes) of its class; `sites_per_well` consecutive fields of a class share a well, the class's replicate
wells follow each other across `plate_format`-well plates (wells filled row by row, A01, A02, ...), so every plate
holds wells of every class. `meta` carries source, plate, well, site, perturbation and pert_type as a JUMP field's
does, which lets profile evaluation (per-well aggregation, plate normalisation, replicate mAP) run on it.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from dinocell.data.dataset import DatasetError, SampleDataset
from dinocell.data.normalize import Normalization, check_normalization, normalize_image
from dinocell.data.registry import register_dataset

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
ATTRIBUTES = (
    "elongation",
    "ruffling",
    "nuclear_lobes",
    "chromatin_spots",
    "er_coarseness",
    "nucleoli",
    "actin_fibres",
    "mito_length",
    "mito_spread",
)
_CLASS_TABLE_SEED = 20240501  # class definitions are fixed, independent of the dataset seed and split
_SPLIT_CODES = {"train": 0, "test": 1}
_DNA, _ER, _RNA, _AGP, _MITO = range(5)
PLATE_SHAPES = {96: (8, 12), 384: (16, 24)}  # plate format -> (rows, columns)



def phenotype_table(n_classes: int) -> np.ndarray:
    """[n_classes, len(ATTRIBUTES)] attribute levels in [0, 1]: per attribute, a fixed permutation of K even levels."""
    rng = np.random.default_rng(_CLASS_TABLE_SEED)
    levels = np.linspace(0.0, 1.0, n_classes) if n_classes > 1 else np.zeros(1)
    return np.stack([levels[rng.permutation(n_classes)] for _ in ATTRIBUTES], axis=1)


@register_dataset("SyntheticCellPainting")
class SyntheticCellPainting(SampleDataset):
    """Procedural 5-channel Cell Painting fields (DNA, ER, RNA, AGP, Mito) with K phenotype classes."""

    def __init__(
        self,
        *,
        size: int = 10000,
        image_size: int = 256,
        n_classes: int = 4,
        seed: int = 0,
        split: Literal["train", "test"] = "train",
        cell_radius: float = 20.0,
        normalization: Normalization = "percentile",
        sites_per_well: int = 4,
        plate_format: Literal[96, 384] = 384,
        control_class: int | None = 0,
        transform=None,
    ) -> None:
        """sites_per_well, plate_format, control_class: the plate layout of the metadata (module docstring);
        control_class=none gives a layout without negative controls."""
        for key, value in (("size", size), ("image_size", image_size), ("n_classes", n_classes),
                           ("sites_per_well", sites_per_well)):
            if value < 1:
                raise DatasetError(f"SyntheticCellPainting: {key}={value} must be >= 1")
        if not 2.0 <= cell_radius <= image_size:
            raise DatasetError(f"SyntheticCellPainting: cell_radius={cell_radius} must lie in [2, image_size]")
        if split not in _SPLIT_CODES:
            raise DatasetError(f"SyntheticCellPainting: split='{split}' must be one of {', '.join(_SPLIT_CODES)}")
        check_normalization(normalization, "SyntheticCellPainting")
        if plate_format not in PLATE_SHAPES:
            raise DatasetError(f"SyntheticCellPainting: plate_format={plate_format} must be one of 96, 384")
        if control_class is not None and not 0 <= control_class < n_classes:
            raise DatasetError(
                f"SyntheticCellPainting: control_class={control_class} must lie in [0, {n_classes - 1}] or be none"
            )
        self.sites_per_well, self.plate_format, self.control_class = sites_per_well, plate_format, control_class
        self.size, self.image_size, self.seed, self.split = size, image_size, seed, split
        self.cell_radius, self.normalization, self.transform = cell_radius, normalization, transform
        self.classes = [f"phenotype_{k}" for k in range(n_classes)]
        self.channel_names = list(CHANNELS)
        self._phenotypes = phenotype_table(n_classes)

    def __len__(self) -> int:
        return self.size

    def label_of(self, index: int) -> int:
        """Classes cycle with the index, so every contiguous range of samples is balanced."""
        return index % len(self.classes)

    def layout_of(self, index: int) -> dict[str, str | int]:
        """Plate metadata of sample `index` (see the module docstring)."""
        n_classes = len(self.classes)
        label, number = index % n_classes, index // n_classes  # number: the field's rank within its class
        replicate, site = divmod(number, self.sites_per_well)
        plate, position = divmod(replicate * n_classes + label, self.plate_format)
        row, column = divmod(position, PLATE_SHAPES[self.plate_format][1])
        return {
            "source": "synthetic",
            "plate": f"SYN-{self.split}-{plate:03d}",
            "well": f"{chr(ord('A') + row)}{column + 1:02d}",
            "site": site + 1,
            "perturbation": self.classes[label],
            "pert_type": "negcon" if label == self.control_class else "trt",
        }

    def render_field(self, index: int) -> tuple[np.ndarray, dict[str, int]]:
        """The raw uint16 field [5, H, W] of sample `index` and counts worth keeping (number of cells)."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for SyntheticCellPainting of size {self.size}")
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])
        return _render(rng, self.image_size, self.cell_radius, self._phenotypes[self.label_of(index)])

    def __getitem__(self, index: int) -> dict:
        raw, counts = self.render_field(index)
        image = normalize_image(torch.from_numpy(raw.astype(np.float32)), self.normalization)
        label = self.label_of(index)
        sample = {
            "image": image,
            "label": label,
            "id": f"synthetic/{self.split}/seed{self.seed}/{index}",
            "meta": {"class_name": self.classes[label], "split": self.split, "index": index, **counts,
                     **self.layout_of(index)},
        }
        return self.transform(sample) if self.transform is not None else sample


def _render(rng: np.random.Generator, size: int, radius: float, phenotype: np.ndarray) -> tuple[np.ndarray, dict]:
    """Render one field: smooth compartments per cell window (all cells at once), spots splatted and blurred once."""
    p = dict(zip(ATTRIBUTES, phenotype.tolist()))
    radius *= rng.uniform(0.85, 1.15)
    spacing = 2.3 * radius
    centres = _cell_centres(rng, size, spacing)
    cells = _cell_geometry(rng, centres, radius, p)
    half = int(cells["a"].max(initial=radius) * 1.3) + 3
    pad = half + int(spacing) + 2
    canvas = np.zeros((5, size + 2 * pad, size + 2 * pad), np.float32)  # nucleus, ER base, RNA, AGP, Mito
    for start in range(0, len(centres), 64):  # chunks bound the memory of the [cells, 5, W, W] windows
        chunk = {k: v[start : start + 64] for k, v in cells.items()}
        windows = _cell_windows(chunk, half, p)
        for (cy, cx), window in zip(chunk["icentre"], windows):
            canvas[:, cy + pad - half : cy + pad + half + 1, cx + pad - half : cx + pad + half + 1] += window
    canvas = canvas[:, pad : pad + size, pad : pad + size]
    fine, coarse = _noise(rng, size, 2.0), _noise(rng, size, 8.0)
    er_texture = (1.0 - p["er_coarseness"]) * fine + p["er_coarseness"] * coarse
    fields = canvas * rng.lognormal(0.0, 0.5, (5, 1, 1)).astype(np.float32)  # staining: diffuse vs spot share
    fields[_DNA] *= 0.75 + 0.5 * fine
    fields[_ER] *= 0.2 + 1.3 * er_texture**2
    _splat(fields, _spots(rng, cells, radius, p), sigma=max(radius / 20.0, 0.6))
    inside = ((centres >= 0) & (centres < size)).all(axis=1)
    return _acquire(rng, fields), {"n_cells": int(inside.sum())}


def _cell_centres(rng: np.random.Generator, size: int, spacing: float) -> np.ndarray:
    """[n, 2] (y, x): a jittered hexagonal grid thinned at a per-field density, so cells rarely pile up."""
    n_grid = int(size / spacing) + 2
    gy, gx = np.meshgrid(np.arange(n_grid), np.arange(n_grid), indexing="ij")
    y = gy - 0.5 + rng.uniform(-0.35, 0.35, gy.shape)
    x = gx - 0.5 + 0.5 * (gy % 2) + rng.uniform(-0.35, 0.35, gx.shape)
    keep = rng.random(gy.shape) < rng.uniform(0.3, 1.0)
    centres = (np.stack([y[keep], x[keep]], axis=1) * spacing).astype(np.float32)
    return centres[((centres >= -spacing) & (centres < size + spacing)).all(axis=1)]


def _cell_geometry(rng: np.random.Generator, centres: np.ndarray, radius: float, p: dict) -> dict[str, np.ndarray]:
    """Per-cell random shape parameters (arrays over cells)."""
    n = len(centres)
    r = radius * rng.uniform(0.9, 1.1, n).astype(np.float32)
    elong = 1.0 + 1.4 * p["elongation"]
    theta = rng.uniform(0, math.pi, n).astype(np.float32)
    a = r * math.sqrt(elong)
    nu_shift = rng.uniform(-0.15, 0.15, n).astype(np.float32) * a
    icentre = np.rint(centres).astype(np.int64)
    return {
        "icentre": icentre,
        "offset": (centres - icentre).astype(np.float32),  # sub-pixel part of the centre
        "r": r,
        "a": a,
        "b": r / math.sqrt(elong),
        "theta": theta,
        "nu_shift": nu_shift,
        "nucleus_yx": centres + nu_shift[:, None] * np.stack([np.sin(theta), np.cos(theta)], axis=1),
        "edge": _harmonic_params(rng, n, (2, 3, 5), 0.04 + 0.14 * p["ruffling"]),
        "lobes": _harmonic_params(rng, n, (3, 4), 0.03 + 0.22 * p["nuclear_lobes"]),
        "fibre_phase": rng.uniform(0, 2 * math.pi, n).astype(np.float32),
        "bright": rng.lognormal(0.0, 0.2, (n, 5)).astype(np.float32),
    }


def _cell_windows(c: dict[str, np.ndarray], half: int, p: dict) -> np.ndarray:
    """[n, 5, W, W] diffuse compartments of each cell around its integer centre, in channel order."""
    d = np.arange(-half, half + 1, dtype=np.float32)
    col = lambda x: x[:, None, None]  # noqa: E731
    dy = d[None, :, None] - col(c["offset"][:, 0])
    dx = d[None, None, :] - col(c["offset"][:, 1])
    cos, sin = col(np.cos(c["theta"])), col(np.sin(c["theta"]))
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # u along the long axis
    a, b, r = col(c["a"]), col(c["b"]), col(c["r"])

    # cell body with a ruffled boundary (low harmonics of the polar angle) and a 1.5 px soft edge
    ua, vb = u / a, v / b
    rho = np.sqrt(ua**2 + vb**2)
    edge = 1.0 + _harmonics(ua, vb, rho, c["edge"])
    inside = (edge - rho) * b / 1.5
    cell = np.clip(inside, 0.0, 1.0)

    # nucleus: off-centre ellipse of constant area, smooth or lobed
    rn = 0.42 * r
    en = (1.0 + 1.4 * p["elongation"]) ** 0.25
    un, vn = (u - col(c["nu_shift"])) / (rn * en), v * en / rn
    rho_n = np.sqrt(un**2 + vn**2)
    lobes = 1.0 + _harmonics(un, vn, rho_n, c["lobes"])
    nucleus = np.clip((lobes - rho_n) * rn / 1.2, 0.0, 1.0)
    cyto = cell * (1.0 - nucleus)

    bright = c["bright"][:, :, None, None]
    perinuclear = np.exp(-np.maximum(rho_n - 1.0, 0.0) * 0.8)
    ring = np.exp(-np.square(inside / 1.3)) * (inside > -0.45 * b / 1.5)  # cortical actin and membrane band
    fibres = np.square(0.5 + 0.5 * np.cos(2 * math.pi / 4.0 * v + col(c["fibre_phase"])))
    w_fib = p["actin_fibres"]
    out = np.empty((len(u), 5, *u.shape[1:]), np.float32)
    out[:, _DNA] = bright[:, _DNA] * nucleus
    out[:, _ER] = bright[:, _ER] * cyto * perinuclear
    out[:, _RNA] = bright[:, _RNA] * (0.25 * cyto + 0.35 * nucleus)
    out[:, _AGP] = bright[:, _AGP] * (0.9 * (1 - w_fib) * ring + 1.2 * w_fib * fibres * cyto)
    out[:, _MITO] = bright[:, _MITO] * 0.1 * cyto
    return out


def _spots(rng: np.random.Generator, c: dict[str, np.ndarray], radius: float, p: dict) -> np.ndarray:
    """Point masses (channel, y, x, weight): chromatin and nucleoli in the nucleus, Golgi beside it, mitochondria."""
    n = len(c["r"])
    ny, nx = c["nucleus_yx"][:, 0:1], c["nucleus_yx"][:, 1:2]
    rn = 0.42 * c["r"][:, None]
    bright = c["bright"]

    def in_nucleus(count: int, reach: float) -> tuple[np.ndarray, np.ndarray]:
        rad = rn * reach * np.sqrt(rng.random((n, count)))
        ang = rng.uniform(0, 2 * math.pi, (n, count))
        return ny + rad * np.sin(ang), nx + rad * np.cos(ang)

    n_chrom = int(round(2 + 14 * p["chromatin_spots"]))
    chrom = _rows(_DNA, *in_nucleus(n_chrom, 0.75), 60.0 / n_chrom * bright[:, _DNA : _DNA + 1])
    n_nucleoli = int(round(1 + 5 * p["nucleoli"]))
    scale = (radius / 20.0) ** 2
    nucleoli = _rows(_RNA, *in_nucleus(n_nucleoli, 0.55), 36.0 * scale / n_nucleoli * bright[:, _RNA : _RNA + 1])
    golgi_dir = rng.uniform(0, 2 * math.pi, (n, 1))
    gy = ny + 1.25 * rn * np.sin(golgi_dir) + rng.normal(0, 1, (n, 12)) * 0.2 * rn
    gx = nx + 1.25 * rn * np.cos(golgi_dir) + rng.normal(0, 1, (n, 12)) * 0.2 * rn
    golgi = _rows(_AGP, gy, gx, bright[:, _AGP : _AGP + 1])
    return np.concatenate([chrom, nucleoli, golgi, _mitochondria(rng, c, radius, p)])


def _mitochondria(rng: np.random.Generator, c: dict[str, np.ndarray], radius: float, p: dict) -> np.ndarray:
    """Segments of points (dots when short, tubules when long); total mass fixed so length is not a mean shift."""
    n = len(c["r"])
    length = (1.0 + 12.0 * p["mito_length"]) * radius / 20.0
    n_seg = max(int(160 * (radius / 20.0) ** 2) // int(length + 1), 1)
    spread = 0.15 + 0.85 * p["mito_spread"]  # 0: clustered around the nucleus, 1: out to the membrane
    frac = 1.0 + rng.random((n, n_seg)) ** (1.0 / (0.6 + 1.4 * spread)) * spread * 1.6
    ang = rng.uniform(0, 2 * math.pi, (n, n_seg))
    rn = 0.42 * c["r"][:, None]
    su = frac * rn * np.cos(ang) * (c["a"] / c["r"])[:, None]
    sv = frac * rn * np.sin(ang) * (c["b"] / c["r"])[:, None]
    cos, sin = np.cos(c["theta"])[:, None], np.sin(c["theta"])[:, None]
    sy = c["nucleus_yx"][:, 0:1] + su * sin + sv * cos
    sx = c["nucleus_yx"][:, 1:2] + su * cos - sv * sin
    seg_ang = (ang + math.pi / 2 + rng.normal(0, 0.6, (n, n_seg)))[..., None]  # roughly tangential networks
    steps = np.linspace(-0.5, 0.5, int(length) + 1, dtype=np.float32) * length
    py, px = sy[..., None] + steps * np.sin(seg_ang), sx[..., None] + steps * np.cos(seg_ang)
    return _rows(_MITO, py, px, 2.0 * c["bright"][:, _MITO, None, None])


def _rows(channel: int, y: np.ndarray, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Point masses as rows (channel, y, x, weight); `weight` broadcasts against y."""
    w = np.broadcast_to(weight, y.shape).ravel()
    return np.stack([np.full(w.shape, channel), y.ravel(), x.ravel(), w], axis=1).astype(np.float32)


def _harmonic_params(rng: np.random.Generator, n: int, orders: tuple[int, ...], amplitude: float) -> np.ndarray:
    """[n, len(orders), 3]: order k, A_k cos(phase_k), A_k sin(phase_k) of sum_k A_k cos(k phi + phase_k)."""
    amp = rng.uniform(0.3, 1.0, (n, len(orders))) * amplitude
    phase = rng.uniform(0, 2 * math.pi, (n, len(orders)))
    out = np.empty((n, len(orders), 3), np.float32)
    out[:, :, 0], out[:, :, 1], out[:, :, 2] = orders, amp * np.cos(phase), amp * np.sin(phase)
    return out


def _harmonics(x: np.ndarray, y: np.ndarray, rho: np.ndarray, params: np.ndarray) -> np.ndarray:
    """sum_k A_k cos(k phi + phase_k), phi the polar angle of (x, y); cos/sin of k phi by angle addition (no trig)."""
    inv = 1.0 / np.maximum(rho, 1e-6)
    c1, s1 = x * inv, y * inv
    ck, sk = c1, s1
    out = np.zeros(x.shape, np.float32)
    orders = params[0, :, 0].astype(int).tolist()
    for k in range(1, max(orders) + 1):
        if k > 1:
            ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
        if k in orders:
            j = orders.index(k)
            out += params[:, j, 1, None, None] * ck
            out -= params[:, j, 2, None, None] * sk
    return out


def _noise(rng, size: int, grain: float) -> np.ndarray:
    """Smooth noise in [0, 1] with features of about `grain` px: low-resolution uniform noise, bilinearly upsampled."""
    low = max(int(size / grain), 2)
    base = torch.from_numpy(rng.random((1, 1, low, low), dtype=np.float32))
    return F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def _splat(fields: np.ndarray, rows: np.ndarray, sigma: float) -> None:
    """Add point masses to their nearest pixel, then blur them with a separable Gaussian (in place, symmetric taps)."""
    size = fields.shape[-1]
    c, y, x, w = rows[:, 0].astype(np.int64), np.rint(rows[:, 1]), np.rint(rows[:, 2]), rows[:, 3]
    inside = (y >= 0) & (y < size) & (x >= 0) & (x < size)
    half = int(3 * sigma + 0.5)
    taps = np.exp(-(np.arange(half + 1, dtype=np.float32) ** 2) / (2 * sigma**2))
    taps /= taps[0] + 2 * taps[1:].sum()
    spots = np.zeros((fields.shape[0], size + 2 * half, size + 2 * half), np.float32)
    np.add.at(spots, (c[inside], y[inside].astype(np.int64) + half, x[inside].astype(np.int64) + half), w[inside])
    rows_blurred = spots[:, :, half : half + size] * taps[0]
    for i in range(1, half + 1):
        rows_blurred += taps[i] * (spots[:, :, half - i : half - i + size] + spots[:, :, half + i : half + i + size])
    fields += rows_blurred[:, half : half + size] * taps[0]
    for i in range(1, half + 1):
        fields += taps[i] * (rows_blurred[:, half - i : half - i + size] + rows_blurred[:, half + i : half + i + size])


def _acquire(rng: np.random.Generator, fields: np.ndarray) -> np.ndarray:
    """Microscope nuisances: per-channel response curve, gain and background, illumination ramp, noise -> uint16."""
    size = fields.shape[-1]
    gamma = np.exp(rng.uniform(math.log(0.6), math.log(1.6), (5, 1, 1)))
    gain = np.exp(rng.uniform(math.log(0.4), math.log(2.5), (5, 1, 1))) * 6000.0
    background = rng.uniform(100.0, 800.0, (5, 1, 1))
    ramp_dir, ramp_strength = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.15)
    noise_seed = int(rng.integers(2**62))
    coords = torch.linspace(-1.0, 1.0, size)
    ramp = 1.0 + ramp_strength * (coords[None, :] * math.cos(ramp_dir) + coords[:, None] * math.sin(ramp_dir))
    signal = torch.from_numpy(fields).pow_(torch.from_numpy(gamma).float())
    signal.mul_(torch.from_numpy(gain).float()).add_(torch.from_numpy(background).float()).mul_(ramp)
    # shot noise (variance ~ 2 x signal) and read noise (std 20); torch's generator is faster than numpy's here
    noise = torch.randn(signal.shape, generator=torch.Generator().manual_seed(noise_seed))
    noise.mul_(signal.mul(2.0).add_(400.0).sqrt_())
    return signal.add_(noise).clamp_(0, 65535).numpy().astype(np.uint16)
