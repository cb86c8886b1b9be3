"""Axial rotary position embedding (RoPE) as in DINOv3: positions are normalised patch centres, so one model
serves every resolution; sin/cos are computed in fp32 and rotate only the patch tokens' queries and keys."""

import math

import torch
from torch import nn


class RopePositionEmbedding(nn.Module):
    """Returns (sin, cos) of shape [H*W, head_dim] for a patch grid of H x W.

    Patch centre (i + 0.5) / H is mapped to [-1, 1] per axis; frequencies are split between the y and x axes.
    The coordinate augmentations (shift, jitter, rescale) are drawn per call in training mode only.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        base: float = 100.0,
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        head_dim = embed_dim // num_heads
        if head_dim % 4:
            raise ValueError(
                f"RoPE needs head_dim = embed_dim / num_heads divisible by 4, got {embed_dim}/{num_heads} = {head_dim}"
            )
        self.head_dim = head_dim
        self.base = base
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rescale_coords = rescale_coords
        self.register_buffer("periods", torch.empty(head_dim // 4, device=device, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        quarter = self.head_dim // 4
        exponents = 2 * torch.arange(quarter, device=self.periods.device, dtype=torch.float32) / (self.head_dim // 2)
        self.periods.copy_(self.base**exponents)

    def _augment(self, coords: torch.Tensor) -> torch.Tensor:
        """Training-only perturbations of the coordinates, so the model does not overfit to one grid."""
        if self.shift_coords is not None:
            coords = coords + torch.empty(2, device=coords.device).uniform_(-self.shift_coords, self.shift_coords)
        if self.jitter_coords is not None:
            log_jitter = math.log(self.jitter_coords)
            coords = coords * torch.empty(2, device=coords.device).uniform_(-log_jitter, log_jitter).exp()
        if self.rescale_coords is not None:
            log_rescale = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, device=coords.device).uniform_(-log_rescale, log_rescale).exp()
        return coords

    def forward(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.periods.device
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)  # [HW, 2] in [0, 1]
        coords = 2.0 * coords - 1.0
        if self.training:
            coords = self._augment(coords)
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]  # [HW, 2, head_dim/4]
        angles = angles.flatten(1, 2).tile(2)  # [HW, head_dim]
        return torch.sin(angles), torch.cos(angles)


def rope_rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotates the last sin.shape[0] tokens of x [B, heads, T, head_dim] in fp32; prefix tokens stay unrotated."""
    n_prefix = x.shape[-2] - sin.shape[-2]
    prefix, patches = x[..., :n_prefix, :], x[..., n_prefix:, :]
    rotated = patches.float() * cos + rope_rotate_half(patches.float()) * sin
    return torch.cat((prefix, rotated.to(x.dtype)), dim=-2)
