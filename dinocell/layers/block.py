"""Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(ffn(norm2 x)), with optional drop path."""

import torch
from torch import nn

from dinocell.layers.attention import Rope, SelfAttention
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
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), rope)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
