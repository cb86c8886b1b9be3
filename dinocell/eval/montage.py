"""What the model sees: per sample, the field, each of its channels, and the global and local crops of the training
transform, in one labelled PNG (one row per sample).

Crops are drawn as they leave the transform (after flips, intensity augmentation and normalisation), each channel
stretched to its display range, and enlarged (nearest) to the tile size so that a 96 px local crop shows its real
pixel count. A crop whose channels are all equal (a `mean` or `single` view replicated to in_chans) is drawn grey.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from dinocell.eval.render import channel_labels, composite, grey, labelled, tile_factor, tile_grid, to_uint8

CropTransform = Callable[[dict, int], dict]  # (sample, position) -> {"global_crops": [...], "local_crops": [...]}


def _fit(picture: np.ndarray, side: int, nearest: bool) -> np.ndarray:
    """A float [H, W, 3] picture scaled to fit a side x side tile (aspect kept, black borders)."""
    image = Image.fromarray(to_uint8(picture))
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS)
    tile = Image.new("RGB", (side, side))
    tile.paste(image, ((side - size[0]) // 2, (side - size[1]) // 2))
    return np.asarray(tile)


def _crop_picture(crop: torch.Tensor, names: Sequence[str] | None) -> np.ndarray:
    if crop.shape[0] == 1 or bool((crop == crop[:1]).all()):
        return grey(crop[0])
    return composite(crop, names if names is not None and len(names) == crop.shape[0] else None)


def crop_montage(
    dataset: Sequence[dict],
    transform: CropTransform,
    indices: Sequence[int],
    *,
    channel_names: Sequence[str] | None = None,
    views: dict[str, str] | None = None,
) -> np.ndarray:
    """uint8 [rows, columns, 3] montage of `dataset[i]` for i in `indices` (transform position = i).

    `views` ({"global1": "all", ...}, the config's crops.channel_views) only labels the crop tiles.
    """
    rows = []
    for index in indices:
        sample = dataset[index]
        crops = transform(sample, index)
        image: torch.Tensor = sample["image"]
        side = crops["global_crops"][0].shape[-1]
        side *= tile_factor(side)
        names = list(channel_names) if channel_names is not None else None
        tiles = [labelled(_fit(composite(image, names), side, nearest=False), f"field {index}")]
        if image.shape[0] > 1:
            tiles += [
                labelled(_fit(grey(channel), side, nearest=False), label)
                for label, channel in zip(channel_labels(image.shape[0], names), image, strict=True)
            ]
        for group, group_crops in (("global", crops["global_crops"]), ("local", crops["local_crops"])):
            for k, crop in enumerate(group_crops):
                view = (views or {}).get(f"global{k + 1}" if group == "global" else "local")
                label = f"{group} {k + 1}" + (f" ({view})" if view else "")
                tiles.append(labelled(_fit(_crop_picture(crop, channel_names), side, nearest=True), label))
        rows.append(tiles)
    columns = max(len(r) for r in rows)
    blank = np.full_like(rows[0][0], 255)
    return tile_grid([t for r in rows for t in r + [blank] * (columns - len(r))], columns=columns)
