"""Stochastic depth: drop a whole residual branch per sample during training."""

from collections.abc import Sequence

import torch
from torch import nn

from dinocell.layers.attention import TokenGroup


class DropPath(nn.Module):
    """Zeroes the branch for a random subset of samples and rescales the rest, so the expectation is unchanged.

    forward reads the keep probability from a 0-dim buffer, never the Python float `drop_prob`: torch.compile
    specialises on float attributes, so blocks with different rates (the linear ramp) would each need their own graph
    and exhaust its recompile limit; a tensor is a graph input, and one graph serves every block. The buffer is not
    saved in state dicts (the rate comes from the config).
    """

    def __init__(self, drop_prob: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob
        self.register_buffer("keep_prob", torch.empty((), device=device), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fill the buffer (again after a meta-device build and to_empty())."""
        self.keep_prob.fill_(1.0 - self.drop_prob)

    def forward(self, x: torch.Tensor, groups: Sequence[TokenGroup] | None = None) -> torch.Tensor:
        """x: a batch [B, ...] (one draw per sample along dim 0), or tokens [B, T, D] / flat [N, D] laid out as
        `groups` (one draw per image of each group, shared by its tokens)."""
        if not self.training:
            return x
        sizes = [x.shape[0]] if groups is None else [g.batch for g in groups]
        keep = torch.rand(sum(sizes), device=x.device) < self.keep_prob
        scale = (keep / self.keep_prob).to(x.dtype)
        if groups is None:
            return x * scale.view((-1,) + (1,) * (x.ndim - 1))
        per_token = torch.cat([s.repeat_interleave(g.tokens) for s, g in zip(scale.split(sizes), groups)])
        return (x.reshape(-1, x.shape[-1]) * per_token[:, None]).view(x.shape)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
