"""Feed-forward layers of a transformer block: GELU MLP (ViT-S/B/L) and SwiGLU (ViT-S+/H+/7B)."""

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (official names fc1/fc2)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias, device=device)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def swiglu_hidden_dim(hidden_dim: int, align_to: int = 8) -> int:
    """SwiGLU has 3 matrices instead of 2, so DINOv3 keeps the cost by using 2/3 of the width, rounded up."""
    d = int(hidden_dim * 2 / 3)
    return d + (-d % align_to)


class SwiGLUFFN(nn.Module):
    """w3(silu(w1 x) * w2 x) with the official names w1 (gate), w2 (up), w3 (down)."""

    def __init__(
        self, dim: int, hidden_dim: int, bias: bool = True, align_to: int = 8, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        inner = swiglu_hidden_dim(hidden_dim, align_to)
        self.w1 = nn.Linear(dim, inner, bias=bias, device=device)
        self.w2 = nn.Linear(dim, inner, bias=bias, device=device)
        self.w3 = nn.Linear(inner, dim, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))
