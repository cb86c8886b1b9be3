"""PCA feature maps (the DINOv2/v3 picture): the first three principal components of the patch tokens as RGB.

The components are fitted over the patches of all images given, so colours mean the same thing in every image.
With a foreground threshold, patches whose first component (scaled to [0, 1] over the fitted set) lies above it are
foreground; the three components are then refitted on the foreground patches alone and the background is black.
The sign of a principal component is arbitrary; it is fixed here so that each component's largest loading is
positive, which makes the colours reproducible but says nothing about which side is foreground: `invert` flips it.
Each component is scaled to [0, 1] by its 1st-99th percentile over the fitted patches, then clipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dinocell.eval.errors import EvalError
from dinocell.eval.render import labelled, safe_stem, save_png, tile_factor, tile_grid, upsample

SCALE_PERCENTILES = (0.01, 0.99)


@dataclass
class PatchPCA:
    mean: torch.Tensor  # [D]
    components: torch.Tensor  # [K, D], orthonormal rows
    low: torch.Tensor  # [K], 1st percentile of each component over the fitted patches
    high: torch.Tensor  # [K], 99th percentile

    def scaled(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., K] projections mapped to [0, 1] (low -> 0, high -> 1, clipped)."""
        projected = (tokens.float() - self.mean) @ self.components.T
        return ((projected - self.low) / (self.high - self.low).clamp_min(1e-12)).clamp(0.0, 1.0)


@torch.inference_mode()
def patch_tokens(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Normalised patch tokens of a batch [B, C, H, W] on the patch grid: [B, h, w, D] float32 on CPU."""
    was_training = backbone.training
    backbone.eval()
    try:
        tokens = backbone.forward_features(images)["x_norm_patchtokens"].float()
    finally:
        backbone.train(was_training)
    rows, cols = backbone.patch_embed.grid_size(images)
    return tokens.reshape(images.shape[0], rows, cols, -1).cpu()


def fit_pca(tokens: torch.Tensor, n_components: int = 3) -> PatchPCA:
    """Principal axes of tokens [M, D] (M >= n_components) by SVD of the centred matrix."""
    if tokens.ndim != 2 or tokens.shape[0] < n_components or tokens.shape[1] < n_components:
        raise EvalError(f"PCA of {n_components} components needs tokens [M, D] with M, D >= {n_components}, "
                         f"got {tuple(tokens.shape)}")
    tokens = tokens.float()
    mean = tokens.mean(dim=0)
    _, _, vh = torch.linalg.svd(tokens - mean, full_matrices=False)
    components = vh[:n_components]
    largest = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
    components = components * torch.sign(largest)  # deterministic sign: largest loading positive
    projected = (tokens - mean) @ components.T
    low, high = (torch.quantile(projected, q, dim=0) for q in SCALE_PERCENTILES)
    return PatchPCA(mean, components, low, high)


def pca_feature_maps(
    tokens: torch.Tensor, foreground_threshold: float | None = None, invert: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """tokens [B, h, w, D] -> (RGB [B, h, w, 3] in [0, 1], foreground mask [B, h, w] or None)."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    pca = fit_pca(flat)
    if foreground_threshold is None:
        return pca.scaled(tokens), None
    if not 0.0 < foreground_threshold < 1.0:
        raise EvalError(f"foreground threshold must be in (0, 1) (on the scaled first component), got "
                         f"{foreground_threshold}; DINOv2's demo used about 0.5")
    first = pca.scaled(tokens)[..., 0]
    foreground = (first < foreground_threshold) if invert else (first > foreground_threshold)
    if int(foreground.sum()) < 3:
        raise EvalError(f"only {int(foreground.sum())} foreground patches at threshold {foreground_threshold}; "
                         "lower the threshold or flip the side with invert")
    rgb = fit_pca(tokens[foreground]).scaled(tokens) * foreground.unsqueeze(-1)
    return rgb, foreground


def pca_figures(
    pictures: list[np.ndarray], rgb: torch.Tensor, patch_size: int, sample_ids: list[str]
) -> tuple[list[np.ndarray], np.ndarray]:
    """uint8 (per image: image | PCA map, all images in rows of four pairs); `pictures` are the float [H, W, 3]
    display views in [0, 1]."""
    rows, cols = rgb.shape[1:3]
    factor = tile_factor(cols * patch_size)
    pairs, tiles = [], []
    for picture, maps, sample_id in zip(pictures, rgb.numpy(), sample_ids, strict=True):
        image_tile = labelled(upsample(picture[: rows * patch_size, : cols * patch_size], factor), sample_id)
        pca_tile = labelled(upsample(maps, patch_size * factor), "PCA 1-3 as RGB")
        tiles += [image_tile, pca_tile]
        pairs.append(tile_grid([image_tile, pca_tile], columns=2))
    return pairs, tile_grid(tiles, columns=8)


def write_pca(pairs: list[np.ndarray], grid: np.ndarray, out_dir: Path, sample_ids: list[str]) -> list[Path]:
    """`<id>_pca.png` per image and `pca_grid.png`."""
    written = [save_png(pair, out_dir / f"{safe_stem(i)}_pca.png") for pair, i in zip(pairs, sample_ids, strict=True)]
    return [*written, save_png(grid, out_dir / "pca_grid.png")]
