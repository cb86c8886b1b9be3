"""Patch embedding: a strided convolution that turns a [B, C, H, W] image into [B, H/p * W/p, D] tokens."""

import math

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Checks the input (channels, divisibility) so a wrong image fails here with a clear message, not deep inside."""

    def __init__(
        self, patch_size: int, in_chans: int, embed_dim: int, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, device=device)

    def reset_parameters(self) -> None:
        """Uniform in +-1/sqrt(fan_in), as the reference (fan_in = channels * patch area)."""
        bound = math.sqrt(1.0 / (self.in_chans * self.patch_size**2))
        nn.init.uniform_(self.proj.weight, -bound, bound)
        nn.init.uniform_(self.proj.bias, -bound, bound)

    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid (rows, columns) of image batch `x`; raises on a wrong shape."""
        if x.ndim != 4:
            raise ValueError(f"expected an image batch [B, C, H, W], got a tensor of shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels (in_chans), got {c} (input shape {tuple(x.shape)})"
            )
        p = self.patch_size
        if h % p or w % p:
            closest = (max(p, round(h / p) * p), max(p, round(w / p) * p))
            raise ValueError(
                f"image size {h}x{w} is not divisible by the patch size {p}; closest valid size is "
                f"{closest[0]}x{closest[1]}"
            )
        return h // p, w // p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid_size(x)
        return self.proj(x).flatten(2).transpose(1, 2)
