"""Stack transformed samples crop-major (like DINOv2/v3) and attach the iBOT masks the losses need."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dinocell.pipeline.batch import SSLBatch
from dinocell.pipeline.gpu_augmentations import DEVICE_AUGMENTATION_KEY, DeviceAugmentation


def collate_ssl_batch(
    items: Sequence[tuple[dict, int]], mask_planner: Callable[[list[int]], torch.Tensor], local_crops_size: int
) -> SSLBatch:
    """b `(MultiCropTransform output, position)` pairs -> SSLBatch.

    `mask_planner(positions)` returns bool [n_global * b, N] rows in global-crop order
    (dinocell.pipeline.masking.IBotMaskPlanner); `local_crops_size` only shapes the empty [0, C, L, L] local tensor
    when there are no local crops. Samples cut with crops.gpu_augmentations give a batch whose crops the training
    step finishes on its device (SSLBatch.device_augmentation).
    """
    if not items:
        raise ValueError("cannot collate an empty batch: expected at least one transformed sample")
    samples = [crops for crops, _ in items]
    n_global, n_local = len(samples[0]["global_crops"]), len(samples[0]["local_crops"])
    device_augmentation = None
    if DEVICE_AUGMENTATION_KEY in samples[0]:  # crops.gpu_augmentations: unfinished crops and their pending work
        global_crops, local_crops, device_augmentation = DeviceAugmentation.collate(samples, n_global, n_local)
        channels = device_augmentation.in_chans
    else:
        global_crops = torch.stack([s["global_crops"][crop] for crop in range(n_global) for s in samples])
        channels = global_crops.shape[1]
        if n_local:
            local_crops = torch.stack([s["local_crops"][crop] for crop in range(n_local) for s in samples])
    if not n_local:
        local_crops = torch.empty(0, channels, local_crops_size, local_crops_size, dtype=global_crops.dtype)
    masks = mask_planner([position for _, position in items])
    per_crop = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()
    return SSLBatch(
        global_crops=global_crops,
        local_crops=local_crops,
        masks=masks,
        mask_indices=masks.flatten().nonzero().flatten(),
        mask_weights=(1.0 / per_crop).expand_as(masks)[masks],
        n_global_crops=n_global,
        n_local_crops=n_local,
        device_augmentation=device_augmentation,
    )
