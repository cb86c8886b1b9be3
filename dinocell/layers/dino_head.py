"""Projection head of DINO and iBOT: MLP -> L2-normalised bottleneck -> linear layer onto K prototypes.

Parameter names (`mlp.0`, `mlp.2`, ..., `last_layer`) follow DINOv3, so heads in its training checkpoints load as-is.
As in DINOv3 the last layer has no weight normalisation; the trainer freezes it during the first epoch instead.
"""

from __future__ import annotations

import torch
from torch import nn


class DINOHead(nn.Module):
    """`nlayers` Linear layers with GELU in between (in_dim -> hidden_dim ... -> bottleneck_dim), then last_layer."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead nlayers must be >= 1, got {nlayers}; DINOv3 uses 3")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Weights N(0, 0.02^2) cut at +-2 (as DINOv3 calls it), zero biases; call again after meta + to_empty()."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # F.normalize's arithmetic (x / max(||x||, eps)), but the norm, which autocast computes in fp32, is cast to x's
        # dtype first: dividing by an fp32 norm would promote the whole bf16 bottleneck to fp32 and back for the last
        # layer. In fp32 this is exactly F.normalize. fp16 cannot represent 1e-12; the eps only guards a zero vector.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return self.last_layer(x / x.norm(p=2, dim=-1, keepdim=True).clamp_min(eps).to(x.dtype))
