"""Multi-head self-attention with RoPE on patch tokens, through PyTorch SDPA (flash / cuDNN / memory-efficient
kernels on CUDA, a math kernel on CPU).

Tokens arrive flat: the tokens of several crop batches ("groups", e.g. global and local crops) concatenated into one
[N, D] tensor, so the projections run once over all of them; attention runs per group, each image attending to its
own tokens only.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dinocell.layers.rope import Rope, rotate


class TokenGroup(NamedTuple):
    """One crop batch inside a flat token tensor: `batch` images of `tokens` tokens each (rows batch * tokens long,
    image-major), and its RoPE tables in token form (RopePositionEmbedding.token_rotation) or None."""

    batch: int
    tokens: int
    rope: Rope | None


class LinearKMaskedBias(nn.Linear):
    """qkv projection whose key bias is multiplied by a stored mask (0 for the k third): DINOv3 trains without a
    key bias but keeps the tensor, so official checkpoints carry `bias_mask`."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias=True, device=device)
        self.register_buffer("bias_mask", torch.ones(out_features, device=device))
        self.reset_bias_mask()

    def reset_bias_mask(self) -> None:
        third = self.out_features // 3
        self.bias_mask.fill_(1.0)
        self.bias_mask[third : 2 * third] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bias and bias_mask share the module's dtype (Module.to casts both), so this is one small multiply
        return F.linear(x, self.weight, self.bias * self.bias_mask)


class SelfAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        mask_k_bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        if mask_k_bias and qkv_bias:
            self.qkv = LinearKMaskedBias(dim, 3 * dim, device=device)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, device=device)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device)

    def _heads(self, qkv: torch.Tensor, group: TokenGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, heads, T, head_dim] of one group from its rows of the qkv projection; q and k are rotated
        together (one RoPE pass over both)."""
        qkv = qkv.view(group.batch, group.tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, H, T, hd]
        qk, v = qkv[:2], qkv[2]
        if group.rope is not None:
            qk = rotate(qk, *group.rope)
        return qk[0], qk[1], v

    def forward(self, x: torch.Tensor, groups: Sequence[TokenGroup]) -> torch.Tensor:
        """x: [B, T, D] (one group) or flat [N, D] (the groups' rows one after the other); same shape out."""
        d = x.shape[-1]
        qkv = self.qkv(x.reshape(-1, d))
        outs, start = [], 0
        for group in groups:
            rows = group.batch * group.tokens
            q, k, v = self._heads(qkv[start : start + rows], group)
            outs.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(rows, d))
            start += rows
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.proj(out).view(x.shape)

    def cls_attention(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        """Softmax attention of token 0 (cls) to every token, per head: [B, heads, T] (for attention maps).
        x: one crop batch [B, T, D]; rope: its tables in token form."""
        b, t, d = x.shape
        q, k, _ = self._heads(self.qkv(x.reshape(-1, d)), TokenGroup(b, t, rope))
        logits = q[:, :, :1] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        return logits.softmax(dim=-1)[:, :, 0]
