"""Axial rotary position embedding (RoPE) as in DINOv3: positions are normalised patch centres, so one model
serves every resolution; sin/cos are computed in fp32 and rotate only the patch tokens' queries and keys.

The blocks take the tables in "token" form (`token_rotation`): one row per token of a crop batch, the identity
rotation (sin 0, cos 1) on the cls and storage tokens, and the rotate-half sign folded into sin. Rotating is then
three elementwise ops over all tokens, with no prefix slicing or concatenation in any block.
"""

import math

import torch
from torch import nn

Rope = tuple[torch.Tensor, torch.Tensor]


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
        # token tables of deterministic calls, per (grid, prefix); valid while `periods` is the same tensor unchanged
        self._cache: dict[tuple[int, int, int], Rope] = {}
        self._cache_owner: tuple | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        quarter = self.head_dim // 4
        exponents = 2 * torch.arange(quarter, device=self.periods.device, dtype=torch.float32) / (self.head_dim // 2)
        self.periods.copy_(self.base**exponents)

    @property
    def augments(self) -> bool:
        """True when a call draws random coordinate perturbations (training mode with any augmentation set)."""
        return self.training and any(
            a is not None for a in (self.shift_coords, self.jitter_coords, self.rescale_coords)
        )

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

    def forward(self, height: int, width: int) -> Rope:
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

    def token_rotation(self, height: int, width: int, n_prefix: int) -> Rope:
        """Tables for all `n_prefix + height * width` tokens of a crop batch, in the form `rotate` takes.

        Computed once per grid and forward; kept across calls while no coordinate augmentation is drawn (eval, the
        teacher, or training without augmentation), so a steady-state step computes no sin/cos at all.
        """
        if self.augments:
            return token_tables(*self(height, width), n_prefix)
        owner = (self.periods.device, self.periods.dtype, self.periods.data_ptr(), self.periods._version)
        if owner != self._cache_owner:  # moved, reloaded or re-initialised since the tables were made
            self._cache, self._cache_owner = {}, owner
        key = (height, width, n_prefix)
        if key not in self._cache:
            with torch.inference_mode(False):  # tables made under inference mode must stay usable for training
                self._cache[key] = token_tables(*self(height, width), n_prefix)
        return self._cache[key]


def token_tables(sin: torch.Tensor, cos: torch.Tensor, n_prefix: int) -> Rope:
    """(signed sin, cos) [n_prefix + HW, head_dim]: identity rows for the prefix tokens, and sin negated on its first
    half so that x * cos + swap_halves(x) * sin equals the rotate-half form x * cos + rotate_half(x) * sin."""
    half = sin.shape[-1] // 2
    sign = torch.ones(sin.shape[-1], device=sin.device, dtype=sin.dtype)
    sign[:half] = -1.0
    sin = torch.cat((sin.new_zeros(n_prefix, sin.shape[-1]), sin * sign))
    cos = torch.cat((cos.new_ones(n_prefix, cos.shape[-1]), cos))
    return sin, cos


def rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """RoPE of x [..., T, head_dim] with token tables [T, head_dim], in fp32, cast back to x's dtype once."""
    xf = x.float()
    swapped = xf.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [second half, first half]
    return (xf * cos + swapped * sin).to(x.dtype)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotates the last sin.shape[0] tokens of x [B, heads, T, head_dim] with the (sin, cos) that
    RopePositionEmbedding returns; prefix tokens stay unrotated (a convenience outside the blocks' hot path)."""
    return rotate(x, *token_tables(sin, cos, x.shape[-2] - sin.shape[-2]))
