"""Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(ffn(norm2 x)), with optional drop path.

Everything but attention is token-wise, so a block takes the tokens of several crop batches flat ([N, D], see
attention.TokenGroup) and runs norms, projections, FFN and LayerScale once over all of them.
"""

from collections.abc import Sequence

import torch
from torch import nn

from dinocell.layers.attention import Rope, SelfAttention, TokenGroup
from dinocell.layers.drop_path import DropPath
from dinocell.layers.ffn import Mlp, SwiGLUFFN
from dinocell.layers.layer_scale import LayerScale

FFN_LAYERS = ("mlp", "swiglu", "swiglu64")


class SelfAttentionBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        mask_k_bias: bool = False,
        drop_path: float = 0.0,
        layerscale_init: float | None = None,
        norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, device=device)
        self.attn = SelfAttention(dim, num_heads, qkv_bias, proj_bias, mask_k_bias, device=device)
        self.ls1 = LayerScale(dim, layerscale_init, device=device) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, device=device)
        hidden = int(dim * ffn_ratio)
        if ffn_layer == "mlp":
            self.mlp = Mlp(dim, hidden, bias=ffn_bias, device=device)
        elif ffn_layer in ("swiglu", "swiglu64"):
            align = 64 if ffn_layer == "swiglu64" else 8
            self.mlp = SwiGLUFFN(dim, hidden, bias=ffn_bias, align_to=align, device=device)
        else:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected one of {FFN_LAYERS}")
        self.ls2 = LayerScale(dim, layerscale_init, device=device) if layerscale_init is not None else nn.Identity()
        self.drop_path = DropPath(drop_path, device=device) if drop_path > 0 else None

    def forward(
        self, x: torch.Tensor, rope: Rope | None = None, groups: Sequence[TokenGroup] | None = None
    ) -> torch.Tensor:
        """x: one crop batch [B, T, D] with its `rope` (token form), or flat tokens [N, D] laid out as `groups`."""
        if groups is None:
            groups = (TokenGroup(x.shape[0], x.shape[1], rope),)
        x = x + self._drop_path(self.ls1(self.attn(self.norm1(x), groups)), groups)
        return x + self._drop_path(self.ls2(self.mlp(self.norm2(x))), groups)

    def _drop_path(self, branch: torch.Tensor, groups: Sequence[TokenGroup]) -> torch.Tensor:
        return branch if self.drop_path is None else self.drop_path(branch, groups)
