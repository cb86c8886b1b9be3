"""The batch contract between the crop pipeline and the training step."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


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

    @property
    def batch_size(self) -> int:
        return self.global_crops.shape[0] // self.n_global_crops

    def to(self, device: torch.device, non_blocking: bool = False) -> SSLBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> SSLBatch:
        """Called by the DataLoader's pin-memory thread (pin_memory=True), so host-to-device copies can overlap."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> SSLBatch:
        tensors = {f.name: fn(getattr(self, f.name)) for f in fields(self) if torch.is_tensor(getattr(self, f.name))}
        return replace(self, **tensors)
