"""Pixels for every figure: channel composites, heat-map overlays, labelled tile grids, PNG and animated GIF files.

Images here are numpy uint8 [H, W, 3] (or float [H, W, 3] in [0, 1] before `to_uint8`); tensors come in as float
[C, H, W] of any range. Grids are built from pixels, not matplotlib, so their size is exact and known in advance.

Channel colours: a 5-channel image is read as the Cell Painting stains in the order DNA, ER, RNA, AGP, Mito (the
order of SyntheticCellPainting and of JUMP's default `channels`), coloured

    DNA blue, ER green, RNA yellow, AGP orange-red, Mito magenta

and mixed additively (each channel stretched to its own 1-99.5 percentile range first, the sum clipped to 1).
One channel is grey, three are shown as RGB, any other count gets evenly spaced hues. Pass colours by stain name
(`channel_colours(names=...)`) when a dataset orders its channels differently.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dinocell.data.normalize import percentile_normalize
from dinocell.eval.errors import EvalError

STAIN_COLOURS: dict[str, tuple[float, float, float]] = {
    "DNA": (0.0, 0.3, 1.0),
    "ER": (0.0, 1.0, 0.0),
    "RNA": (1.0, 0.9, 0.0),
    "AGP": (1.0, 0.35, 0.0),
    "Mito": (1.0, 0.0, 1.0),
}
CELL_PAINTING_ORDER = ("DNA", "ER", "RNA", "AGP", "Mito")
DISPLAY_PERCENTILES = (1.0, 99.5)
MIN_TILE_SIDE = 96  # small images are enlarged (nearest) so that a tile and its label stay readable
LABEL_HEIGHT = 12  # pixels of the text strip above a labelled tile (PIL's default bitmap font is 11 px high)


def channel_colours(n_channels: int, names: Sequence[str] | None = None) -> np.ndarray:
    """[C, 3] RGB weight of each channel (see the module docstring for the map)."""
    if names is not None:
        if len(names) != n_channels:
            raise EvalError(f"got {len(names)} channel names {list(names)} for an image with {n_channels} channels")
        unknown = [n for n in names if n not in STAIN_COLOURS]
        if unknown:
            raise EvalError(f"no colour for channel name(s) {unknown}; known stains: {', '.join(STAIN_COLOURS)}")
        return np.array([STAIN_COLOURS[n] for n in names], dtype=np.float32)
    if n_channels == 1:
        return np.ones((1, 3), dtype=np.float32)
    if n_channels == 3:
        return np.eye(3, dtype=np.float32)
    if n_channels == len(CELL_PAINTING_ORDER):
        return np.array([STAIN_COLOURS[n] for n in CELL_PAINTING_ORDER], dtype=np.float32)
    return np.array([colorsys.hsv_to_rgb(k / n_channels, 1.0, 1.0) for k in range(n_channels)], dtype=np.float32)


def channel_labels(n_channels: int, names: Sequence[str] | None = None) -> list[str]:
    """Names to print on channel tiles: the given names, the stains of a 5-channel image, else 'channel k'."""
    if names is not None:
        return list(names)
    if n_channels == len(CELL_PAINTING_ORDER):
        return list(CELL_PAINTING_ORDER)
    return [f"channel {c}" for c in range(n_channels)]


def stretch(image: torch.Tensor) -> torch.Tensor:
    """Each channel of a float [C, H, W] mapped to [0, 1] by its display percentiles (undoes any normalisation)."""
    return percentile_normalize(image.detach().float().cpu(), *DISPLAY_PERCENTILES)


def composite(image: torch.Tensor, names: Sequence[str] | None = None) -> np.ndarray:
    """A float [C, H, W] image as one RGB picture, float [H, W, 3] in [0, 1]."""
    weights = torch.from_numpy(channel_colours(image.shape[0], names))
    rgb = torch.einsum("chw,ck->hwk", stretch(image), weights)
    return rgb.clamp_(0.0, 1.0).numpy()


def grey(channel: torch.Tensor) -> np.ndarray:
    """One [H, W] channel as a grey float [H, W, 3] picture in [0, 1]."""
    return np.repeat(stretch(channel[None])[0].numpy()[..., None], 3, axis=2)


def heat_colours(values: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """float [H, W] in [0, 1] -> float [H, W, 3] through a matplotlib colour map."""
    from matplotlib import colormaps

    return colormaps[cmap](np.clip(values, 0.0, 1.0))[..., :3].astype(np.float32)


def overlay(picture: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend a [0, 1] heat map (scaled to its own maximum) over a float [H, W, 3] picture."""
    peak = float(heat.max())
    scaled = heat / peak if peak > 0 else heat
    return (1 - alpha) * picture + alpha * heat_colours(scaled)


def upsample(grid: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upsampling of [h, w, ...] by an integer factor: one patch = one block of pixels."""
    return grid.repeat(factor, axis=0).repeat(factor, axis=1)


def tile_factor(width: int) -> int:
    """Integer enlargement that makes a tile at least MIN_TILE_SIDE pixels wide."""
    return max(1, math.ceil(MIN_TILE_SIDE / width))


def to_uint8(picture: np.ndarray) -> np.ndarray:
    return (np.clip(picture, 0.0, 1.0) * 255).round().astype(np.uint8)


def labelled(picture: np.ndarray, label: str) -> np.ndarray:
    """The picture (uint8 or [0, 1] float [H, W, 3]) with a black strip of LABEL_HEIGHT pixels holding `label`
    (shortened from the left to fit)."""
    tile = picture if picture.dtype == np.uint8 else to_uint8(picture)
    canvas = Image.new("RGB", (tile.shape[1], tile.shape[0] + LABEL_HEIGHT))
    canvas.paste(Image.fromarray(tile), (0, LABEL_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    text = label
    while len(text) > 1 and draw.textlength(text) > tile.shape[1] - 4:  # too wide: keep the end (ids end in numbers)
        text = ".." + text[3:]
    draw.text((2, 0), text, fill=(255, 255, 255))
    return np.asarray(canvas)


def tile_grid(tiles: Sequence[np.ndarray], columns: int, pad: int = 2) -> np.ndarray:
    """uint8 tiles of one size in rows of `columns`, `pad` white pixels between and around them."""
    if not tiles:
        raise ValueError("tile_grid needs at least one tile")
    height, width = tiles[0].shape[:2]
    if any(t.shape[:2] != (height, width) for t in tiles):
        raise ValueError(f"tiles must share one size, got {sorted({t.shape[:2] for t in tiles})}")
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    grid = np.full((pad + rows * (height + pad), pad + columns * (width + pad), 3), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        top, left = pad + (k // columns) * (height + pad), pad + (k % columns) * (width + pad)
        grid[top : top + height, left : left + width] = tile if tile.dtype == np.uint8 else to_uint8(tile)
    return grid


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture if picture.dtype == np.uint8 else to_uint8(picture)).save(path)
    return path


def save_gif(frames: Sequence[np.ndarray], path: str | Path, frame_ms: int = 700) -> Path:
    """An endlessly looping animated GIF of equally sized frames."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f if f.dtype == np.uint8 else to_uint8(f)) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return path


def safe_stem(sample_id: str) -> str:
    """A file name stem from a sample id ('synthetic/test/seed0/3' -> 'synthetic_test_seed0_3')."""
    stem = "".join(c if c.isalnum() or c in "-." else "_" for c in sample_id).strip("._")
    return stem or "image"
