"""The batch contract between the crop pipeline and the training step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dinocell.pipeline.gpu_augmentations import DeviceAugmentation


@dataclass(frozen=True)
class SSLBatch:
    """One rank's batch of B images, crops stacked crop-major (all images' crop 0, then all images' crop 1, ...).

    The iBOT mask bookkeeping is computed here, in the loader workers, so the step needs no GPU-to-CPU sync for it.
    """

    global_crops: torch.Tensor  # [n_global_crops * B, C, G, G]
    local_crops: torch.Tensor  # [n_local_crops * B, C, L, L] (0 rows without local crops)
    masks: torch.Tensor  # bool [n_global_crops * B, N]: iBOT-masked patches of each global crop
    mask_indices: torch.Tensor  # int64 [M]: flat indices of the True entries of `masks`, row-major
    mask_weights: torch.Tensor  # float32 [M]: 1 / (masked patches of that entry's crop), in mask_indices order
    n_global_crops: int
    n_local_crops: int
    # crops.gpu_augmentations: the crops are cut but not finished (C = their views' channels, 1 or in_chans); this is
    # the rest of the per-crop work (photometric parameters, masks, normalisation), which `finish_crops` does on the
    # batch's device. None: the crops are final.
    device_augmentation: DeviceAugmentation | None = None

    @property
    def batch_size(self) -> int:
        return self.global_crops.shape[0] // self.n_global_crops

    def finish_crops(self) -> SSLBatch:
        """The batch with its pending per-crop work done where its tensors are (the training step calls this on the
        device); a batch without any is returned as it is."""
        if self.device_augmentation is None:
            return self
        global_crops, local_crops = self.device_augmentation.finish(self.global_crops, self.local_crops)
        return replace(self, global_crops=global_crops, local_crops=local_crops, device_augmentation=None)

    def to(self, device: torch.device, non_blocking: bool = False) -> SSLBatch:
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> SSLBatch:
        """Called by the DataLoader's pin-memory thread (pin_memory=True), so host-to-device copies can overlap."""
        return map_tensors(self, torch.Tensor.pin_memory)


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with `fn` applied to every tensor in it: through dataclasses (rebuilt with `replace`), dicts, lists and
    tuples; anything else is kept."""
    if torch.is_tensor(value):
        return fn(value)
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: map_tensors(getattr(value, f.name), fn) for f in fields(value) if f.init})
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(item, fn) for item in value)
    return value
