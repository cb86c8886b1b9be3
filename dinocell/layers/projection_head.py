"""SimCLR's projection head g: an MLP from the backbone feature to the space where NT-Xent compares views.

SimCLR v1 (Chen et al. 2020): Linear -> BatchNorm -> ReLU -> Linear; the loss is computed on g(h) while the backbone
feature h is what downstream tasks use (it keeps more information than g(h)). `nlayers` counts the Linear layers;
every layer but the last is followed by BatchNorm (optional) and ReLU. Parameter names: `mlp.<index>.*`.
"""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """`nlayers` Linear layers in_dim -> hidden_dim ... -> out_dim, with [BatchNorm] + ReLU between them."""

    def __init__(
        self, in_dim: int, *, out_dim: int = 128, hidden_dim: int = 2048, nlayers: int = 2, batchnorm: bool = True
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"ProjectionHead nlayers must be >= 1, got {nlayers}; SimCLR v1 uses 2")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(nlayers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batchnorm))  # BatchNorm's shift replaces the bias
            if batchnorm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)
