"""LayerScale: a learned per-channel gain on each residual branch (keeps deep ViTs trainable at start)."""

import torch
from torch import nn


class LayerScale(nn.Module):
    """Multiplies its input by `gamma` (parameter name kept as in official DINOv3 checkpoints)."""

    def __init__(self, dim: int, init_value: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.empty(dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
