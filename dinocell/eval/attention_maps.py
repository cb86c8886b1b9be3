"""DINO attention maps: where the cls token of the last block looks, per head, and DINO's share-of-mass masks.

`backbone.get_last_self_attention` gives the cls token's softmax attention to the patch tokens only; the rest of each
row went to the cls token itself and to the storage (register) tokens. The maps here are renormalised over the patches
(each head's map sums to 1), and the share the patches held before renormalising is kept as `patch_share`: a head
that spends most of its attention on the storage tokens says so instead of looking confident.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dinocell.eval.errors import EvalError
from dinocell.eval.render import labelled, overlay, safe_stem, save_gif, save_png, tile_factor, tile_grid, upsample

DEFAULT_MASS_SHARE = 0.6  # DINO keeps the patches that hold 60 % of the attention mass


@dataclass
class AttentionMaps:
    maps: torch.Tensor  # [B, heads, h, w], each head's map sums to 1 over the patches
    patch_share: torch.Tensor  # [B, heads], share of the cls token's attention that went to patches

    @property
    def num_heads(self) -> int:
        return self.maps.shape[1]


@torch.inference_mode()
def cls_attention_maps(backbone: nn.Module, images: torch.Tensor) -> AttentionMaps:
    """The last block's cls-to-patch attention of a batch [B, C, H, W] on the patch grid, per head."""
    was_training = backbone.training
    backbone.eval()
    try:
        attention = backbone.get_last_self_attention(images).float()  # [B, heads, N]
    finally:
        backbone.train(was_training)
    rows, cols = backbone.patch_embed.grid_size(images)
    share = attention.sum(dim=-1)
    maps = attention / share.clamp_min(torch.finfo(attention.dtype).tiny).unsqueeze(-1)
    return AttentionMaps(maps.reshape(*maps.shape[:2], rows, cols).cpu(), share.cpu())


def attention_mass_mask(maps: torch.Tensor, share: float = DEFAULT_MASS_SHARE) -> torch.Tensor:
    """bool mask of the same shape as `maps` [..., h, w]: per map, the fewest highest-attention patches whose
    attention adds up to at least `share` of the map's total (DINO's rule: a patch is kept while the patches
    brighter than it hold less than `share`)."""
    if not 0.0 < share <= 1.0:
        raise EvalError(f"attention mass share must be in (0, 1], got {share}; DINO uses 0.6")
    flat = maps.flatten(-2)
    values, order = flat.sort(dim=-1, descending=True)
    before = (values.cumsum(dim=-1) - values) / values.sum(dim=-1, keepdim=True)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter(-1, order, before < share)
    return keep.reshape(maps.shape)


@dataclass
class AttentionFigures:
    """uint8 pictures of one image: what `write_attention` saves, or what a tracking sink logs."""

    summary: np.ndarray  # the image and the mean over heads
    heads: np.ndarray  # the image and every head, labelled with the head's share of attention on patches
    frames: list[np.ndarray]  # one labelled tile per head (the animation)
    masks: np.ndarray | None  # per head, the image dimmed outside the patches holding `mass_share`


def attention_figures(
    picture: np.ndarray, attention: AttentionMaps, index: int, patch_size: int, *, mass_share: float | None = None
) -> AttentionFigures:
    """The figures of image `index` of the batch; `picture` is its float [H, W, 3] display view in [0, 1]."""
    maps, shares = attention.maps[index].numpy(), attention.patch_share[index].numpy()
    rows, cols = maps.shape[1:]
    picture = picture[: rows * patch_size, : cols * patch_size]
    factor = tile_factor(picture.shape[1])
    base = upsample(picture, factor)
    pixels = patch_size * factor

    def head_tile(heat: np.ndarray, label: str) -> np.ndarray:
        return labelled(overlay(base, upsample(heat, pixels)), label)

    image_tile = labelled(base, "image")
    frames = [head_tile(maps[k], f"head {k} ({100 * shares[k]:.0f}%)") for k in range(attention.num_heads)]
    mean_tile = head_tile(maps.mean(axis=0), f"mean of {attention.num_heads} heads")
    columns = min(attention.num_heads + 1, 8)
    masks = None
    if mass_share is not None:
        keep = attention_mass_mask(attention.maps[index], mass_share).numpy()
        dimmed = [
            labelled(np.where(upsample(keep[k], pixels)[..., None], base, 0.2 * base), f"head {k}: {mass_share:.0%}")
            for k in range(attention.num_heads)
        ]
        masks = tile_grid([image_tile, *dimmed], columns=columns)
    return AttentionFigures(
        summary=tile_grid([image_tile, mean_tile], columns=2),
        heads=tile_grid([image_tile, *frames], columns=columns),
        frames=frames,
        masks=masks,
    )


def write_attention(figures: AttentionFigures, out_dir: Path, sample_id: str) -> list[Path]:
    """`<id>.png` (summary), `<id>_heads.png`, `<id>_heads.gif` and, when made, `<id>_masks.png`."""
    stem = safe_stem(sample_id)
    written = [
        save_png(figures.summary, out_dir / f"{stem}.png"),
        save_png(figures.heads, out_dir / f"{stem}_heads.png"),
        save_gif(figures.frames, out_dir / f"{stem}_heads.gif"),
    ]
    if figures.masks is not None:
        written.append(save_png(figures.masks, out_dir / f"{stem}_masks.png"))
    return written
