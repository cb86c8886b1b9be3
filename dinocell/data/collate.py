"""Stack transformed samples crop-major (like DINOv2/v3) and attach the iBOT masks the losses need."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def collate_ssl_batch(
    samples: Sequence[dict], mask_planner: Callable[[list[int]], torch.Tensor], local_crops_size: int
) -> dict:
    """Batch of b outputs of MultiCropTransform -> the collate contract of dinocell (see docs/augmentation.md).

    `mask_planner(positions)` returns bool [2*b, N] rows in global-crop order (dinocell.data.masking.IBotMaskPlanner);
    `local_crops_size` only shapes the empty [0, C, L, L] local tensor when there are no local crops.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch: expected at least one transformed sample")
    n_local = len(samples[0]["local_crops"])
    global_crops = torch.stack([s["global_crops"][crop] for crop in range(2) for s in samples])
    if n_local:
        local_crops = torch.stack([s["local_crops"][crop] for crop in range(n_local) for s in samples])
    else:
        channels = global_crops.shape[1]
        local_crops = torch.empty(0, channels, local_crops_size, local_crops_size, dtype=global_crops.dtype)
    positions = [s["position"] for s in samples]
    masks = mask_planner(positions)
    mask_indices = masks.flatten().nonzero().flatten()
    per_crop = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()
    masks_weight = (1.0 / per_crop).expand_as(masks)[masks]
    return {
        "collated_global_crops": global_crops,
        "collated_local_crops": local_crops,
        "collated_masks": masks,
        "mask_indices_list": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.tensor([mask_indices.numel()], dtype=torch.long),
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "ids": [s["id"] for s in samples],
        "positions": torch.tensor(positions, dtype=torch.long),
    }
