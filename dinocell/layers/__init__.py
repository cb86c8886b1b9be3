"""Building blocks of the DINOv3 vision transformer, and the heads (dino_head: DINO/iBOT, projection_head: SimCLR)."""

from dinocell.layers.attention import LinearKMaskedBias, SelfAttention, TokenGroup
from dinocell.layers.block import FFN_LAYERS, SelfAttentionBlock
from dinocell.layers.drop_path import DropPath
from dinocell.layers.ffn import Mlp, SwiGLUFFN, swiglu_hidden_dim
from dinocell.layers.layer_scale import LayerScale
from dinocell.layers.patch_embed import PatchEmbed
from dinocell.layers.rope import Rope, RopePositionEmbedding, apply_rope, rotate

__all__ = [
    "FFN_LAYERS",
    "DropPath",
    "LayerScale",
    "LinearKMaskedBias",
    "Mlp",
    "PatchEmbed",
    "Rope",
    "RopePositionEmbedding",
    "SelfAttention",
    "SelfAttentionBlock",
    "SwiGLUFFN",
    "TokenGroup",
    "apply_rope",
    "rotate",
    "swiglu_hidden_dim",
]
