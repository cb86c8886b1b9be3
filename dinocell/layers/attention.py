"""Multi-head self-attention with RoPE on patch tokens, through PyTorch SDPA (or xFormers on CUDA if installed)."""

import torch
import torch.nn.functional as F
from torch import nn

from dinocell.layers.rope import apply_rope

try:  # optional speed path; never required
    from xformers.ops import memory_efficient_attention
except ImportError:
    memory_efficient_attention = None

Rope = tuple[torch.Tensor, torch.Tensor]


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
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


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

    def _qkv(self, x: torch.Tensor, rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [B, heads, T, head_dim], with RoPE applied to the patch tokens of q and k."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self._qkv(x, rope)
        if memory_efficient_attention is not None and x.is_cuda:
            out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, T, H, hd]
        else:
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.proj(out.reshape(b, t, d))

    def cls_attention(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        """Softmax attention of token 0 (cls) to every token, per head: [B, heads, T] (for attention maps)."""
        q, k, _ = self._qkv(x, rope)
        logits = q[:, :, :1] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        return logits.softmax(dim=-1)[:, :, 0]
