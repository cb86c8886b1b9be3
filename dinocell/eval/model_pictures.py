"""Attention and PCA pictures of a few samples: what `dinocell viz attention|pca` writes and what the trainer draws of
`evaluation.viz_dataset` at every eval period, from one code path.

The model sees each sample's eval view (`EvalTransform`: resize, centre crop, channel rule, normalisation); the
pictures show the same pixels with every channel of the sample as a colour composite (dinocell.eval.render).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dinocell.eval.attention_maps import AttentionFigures, attention_figures, cls_attention_maps, write_attention
from dinocell.eval.pca_maps import patch_tokens, pca_feature_maps, pca_figures
from dinocell.eval.render import composite
from dinocell.pipeline.transforms import EvalTransform


@dataclass
class SampleViews:
    """Model inputs and display pictures of the same samples."""

    images: torch.Tensor  # [B, in_chans, S, S], what the model sees
    pictures: list[np.ndarray]  # float [S, S, 3] in [0, 1]: the same crop, all channels as a composite
    ids: list[str]


def sample_views(
    samples: Sequence[dict], transform: EvalTransform, channel_names: Sequence[str] | None = None
) -> SampleViews:
    """The eval view of each sample (`transform`) and its composite picture (the same crop, unnormalised)."""
    images = torch.stack([transform(s)["image"] for s in samples])
    pictures = []
    for sample in samples:
        display = EvalTransform(transform.size, sample["image"].shape[0], None, None)(sample)["image"]
        pictures.append(composite(display, channel_names))
    return SampleViews(images, pictures, [str(s.get("id", i)) for i, s in enumerate(samples)])


def attention_pictures(
    backbone: nn.Module, views: SampleViews, device: torch.device | str, *, mass_share: float | None = None
) -> list[AttentionFigures]:
    """The attention figures (dinocell.eval.attention_maps) of every sample."""
    attention = cls_attention_maps(backbone, views.images.to(device))
    return [attention_figures(picture, attention, k, backbone.patch_size, mass_share=mass_share)
            for k, picture in enumerate(views.pictures)]


def pca_pictures(
    backbone: nn.Module, views: SampleViews, device: torch.device | str, *,
    foreground_threshold: float | None = None, invert: bool = False,
) -> tuple[list[np.ndarray], np.ndarray]:
    """(per sample: image | PCA map, the grid of all), the components fitted over the patches of all samples."""
    rgb, _ = pca_feature_maps(patch_tokens(backbone, views.images.to(device)), foreground_threshold, invert)
    return pca_figures(views.pictures, rgb, backbone.patch_size, views.ids)


def write_attention_pictures(figures: Sequence[AttentionFigures], views: SampleViews, out_dir: Path) -> list[Path]:
    return [path for figure, sample_id in zip(figures, views.ids, strict=True)
            for path in write_attention(figure, out_dir, sample_id)]
