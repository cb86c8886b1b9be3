"""The DINOv3 vision transformer family: patch embedding, [cls, storage..., patches] tokens, RoPE blocks, final norm.

Parameter and buffer names follow the official DINOv3 layout (cls_token, storage_tokens, mask_token, patch_embed.proj,
rope_embed.periods, blocks.N.*, norm), so official checkpoints load strictly and the trainer can assign
layer-wise learning-rate decay by name.
"""

import difflib
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dinocell.layers import DropPath, PatchEmbed, Rope, RopePositionEmbedding, SelfAttentionBlock, TokenGroup
from dinocell.layers.attention import LinearKMaskedBias
from dinocell.layers.layer_scale import LayerScale

# Published sizes (FACTS section 1) plus two small ones for tests and quick runs.
ARCHS: dict[str, dict] = {
    "vit_test": dict(embed_dim=32, depth=2, num_heads=2, ffn_ratio=4.0, ffn_layer="mlp"),
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, ffn_ratio=4.0, ffn_layer="mlp"),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4.0, ffn_layer="mlp"),
    "vit_small_plus": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6.0, ffn_layer="swiglu"),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4.0, ffn_layer="mlp"),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4.0, ffn_layer="mlp"),
    "vit_huge_plus": dict(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6.0, ffn_layer="swiglu"),
    # the released 7B has no qkv bias and a separate norm for the local crops' cls token
    "vit_7b": dict(
        embed_dim=4096,
        depth=40,
        num_heads=32,
        ffn_ratio=3.0,
        ffn_layer="swiglu64",
        qkv_bias=False,
        untie_global_and_local_cls_norm=True,
    ),
}


class DinoVisionTransformer(nn.Module):
    """DINOv3 ViT. Defaults are those of the released checkpoints (4 storage tokens, LayerScale 1e-5, masked k bias).

    Built on `device="meta"` it allocates nothing and skips `init_weights()`; call `to_empty()` then `init_weights()`.

    Speed options (both off by default; the eager, uncheckpointed path is the tested reference):
    `activation_checkpointing` recomputes each block in the backward pass instead of keeping its activations (less
    memory, about one more forward of compute); `compile_blocks()` compiles each block with torch.compile.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int = 16,
        in_chans: int = 3,
        ffn_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        n_storage_tokens: int = 4,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = 1e-5,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        mask_k_bias: bool = True,
        norm_eps: float = 1e-5,
        untie_cls_and_patch_norms: bool = False,
        untie_global_and_local_cls_norm: bool = False,
        pos_embed_rope_base: float = 100.0,
        pos_embed_rope_shift_coords: float | None = None,
        pos_embed_rope_jitter_coords: float | None = None,
        pos_embed_rope_rescale_coords: float | None = None,
        activation_checkpointing: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if patch_size < 1 or in_chans < 1 or n_storage_tokens < 0:
            raise ValueError(
                f"need patch_size >= 1, in_chans >= 1, n_storage_tokens >= 0; got {patch_size}, {in_chans}, "
                f"{n_storage_tokens}"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.n_blocks = depth
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.n_storage_tokens = n_storage_tokens
        self.activation_checkpointing = activation_checkpointing

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, device=device)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, device=device))
        self.storage_tokens = nn.Parameter(torch.empty(1, n_storage_tokens, embed_dim, device=device))
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim, device=device))
        self.rope_embed = RopePositionEmbedding(
            embed_dim,
            num_heads,
            base=pos_embed_rope_base,
            shift_coords=pos_embed_rope_shift_coords,
            jitter_coords=pos_embed_rope_jitter_coords,
            rescale_coords=pos_embed_rope_rescale_coords,
            device=device,
        )
        # computed on CPU, so that building under `with torch.device("meta")` works too
        drop_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(
                embed_dim,
                num_heads,
                ffn_ratio=ffn_ratio,
                ffn_layer=ffn_layer,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                mask_k_bias=mask_k_bias,
                drop_path=rate,
                layerscale_init=layerscale_init,
                norm_eps=norm_eps,
                device=device,
            )
            for rate in drop_rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps, device=device)
        # Some released models normalise cls + storage tokens with their own LayerNorm: always (cls_norm), or only
        # those of the local crops in training (local_cls_norm; the second crop batch of a list, as the reference).
        self.cls_norm = nn.LayerNorm(embed_dim, eps=norm_eps, device=device) if untie_cls_and_patch_norms else None
        self.local_cls_norm = (
            nn.LayerNorm(embed_dim, eps=norm_eps, device=device) if untie_global_and_local_cls_norm else None
        )
        if torch.device(device or "cpu").type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Reference initialisation: trunc-normal(0.02) linears with zero bias, tokens N(0, 0.02), mask token 0,
        LayerNorm 1/0, LayerScale at its init value, uniform patch embedding, RoPE periods recomputed."""
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.n_storage_tokens:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        self.patch_embed.reset_parameters()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, LinearKMaskedBias):
                    module.reset_bias_mask()
            elif isinstance(module, (nn.LayerNorm, LayerScale, DropPath)):
                module.reset_parameters()

    def compile_blocks(self, **compile_kwargs) -> None:
        """Compile each block in place with torch.compile (Module.compile: parameter names and state dicts stay as
        they are). One graph serves every block (the drop-path rate is a tensor, not a guarded float); fullgraph=True
        by default, so a graph break is an error rather than a silent slowdown. kwargs go to torch.compile."""
        for block in self.blocks:
            block.compile(**{"fullgraph": True, **compile_kwargs})

    def _tokens(self, x: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, Rope]:
        """[cls, storage, patches] tokens of one crop batch (masked patches -> mask_token) and its RoPE tables in
        token form (identity on cls and storage tokens)."""
        h, w = self.patch_embed.grid_size(x)
        patches = self.patch_embed(x)
        cls_token = self.cls_token
        if masks is not None:
            if masks.shape != patches.shape[:2] or masks.dtype != torch.bool:
                raise ValueError(
                    f"masks must be bool [B, N] = {list(patches.shape[:2])}, got {masks.dtype} {list(masks.shape)}"
                )
            patches = torch.where(masks.unsqueeze(-1), self.mask_token.unsqueeze(0), patches)
        else:
            # keeps mask_token in the autograd graph so DDP does not see an unused parameter
            cls_token = cls_token + 0 * self.mask_token
        b = patches.shape[0]
        tokens = torch.cat([cls_token.expand(b, -1, -1), self.storage_tokens.expand(b, -1, -1), patches], dim=1)
        return tokens, self.rope_embed.token_rotation(h, w, 1 + self.n_storage_tokens)

    def _blocks(self, x: torch.Tensor, groups: tuple[TokenGroup, ...]) -> torch.Tensor:
        """All blocks over flat tokens [N, D], each recomputed in backward when activation checkpointing is on."""
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, groups=groups, use_reentrant=False)
            else:
                x = block(x, groups=groups)
        return x

    def _norm(self, x: torch.Tensor, local_crops: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (cls + storage tokens, patch tokens)."""
        n_prefix = 1 + self.n_storage_tokens
        prefix_norm = self.cls_norm if self.cls_norm is not None else self.norm
        if local_crops and self.training and self.local_cls_norm is not None:
            prefix_norm = self.local_cls_norm
        return prefix_norm(x[:, :n_prefix]), self.norm(x[:, n_prefix:])

    def forward_features(
        self, x: torch.Tensor | list[torch.Tensor], masks: torch.Tensor | list[torch.Tensor | None] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """One crop batch -> dict; a list of crop batches (any resolutions) -> list of dicts. The tokens of all
        batches go through the blocks together: concatenated for the token-wise layers, attention per batch.
        Dict keys: x_norm_clstoken [B, D], x_storage_tokens [B, R, D], x_norm_patchtokens [B, N, D],
        x_prenorm [B, 1+R+N, D], masks."""
        if isinstance(x, torch.Tensor):
            return self.forward_features([x], [masks])[0]
        if masks is None:
            masks = [None] * len(x)
        if len(masks) != len(x):
            raise ValueError(f"got {len(x)} crop batches but {len(masks)} masks; pass one mask (or None) per batch")
        tokens, ropes = zip(*(self._tokens(xi, mi) for xi, mi in zip(x, masks)))
        groups = tuple(TokenGroup(t.shape[0], t.shape[1], rope) for t, rope in zip(tokens, ropes))
        flat = tokens[0].flatten(0, 1) if len(tokens) == 1 else torch.cat([t.flatten(0, 1) for t in tokens])
        flat = self._blocks(flat, groups)
        outputs, start = [], 0
        for i, (g, m) in enumerate(zip(groups, masks)):
            t = flat[start : start + g.batch * g.tokens].view(g.batch, g.tokens, -1)
            start += g.batch * g.tokens
            prefix, patches = self._norm(t, local_crops=i == 1)
            outputs.append(
                {
                    "x_norm_clstoken": prefix[:, 0],
                    "x_storage_tokens": prefix[:, 1:],
                    "x_norm_patchtokens": patches,
                    "x_prenorm": t,
                    "masks": m,
                }
            )
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised cls token [B, D] (the global image feature)."""
        return self.forward_features(x)["x_norm_clstoken"]

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last `n` blocks (or of the blocks with the given indices), for probes and dense tasks.

        Each entry is the patch tokens [B, N, D] (or [B, D, h, w] with reshape), or (patches, cls [B, D]) with
        return_class_token.
        """
        indices = list(range(self.n_blocks - n, self.n_blocks)) if isinstance(n, int) else list(n)
        if not indices or any(not 0 <= i < self.n_blocks for i in indices):
            raise ValueError(f"block indices must be in [0, {self.n_blocks - 1}] (n <= {self.n_blocks}), got {n}")
        h, w = self.patch_embed.grid_size(x)
        t, rope = self._tokens(x, None)
        taken = {}
        for i, block in enumerate(self.blocks[: max(indices) + 1]):
            t = block(t, rope)
            taken[i] = t
        n_prefix = 1 + self.n_storage_tokens
        outputs = []
        for t in (taken[i] for i in indices):  # in the order asked for, repeats included
            prefix, patches = self._norm(t) if norm else (t[:, :n_prefix], t[:, n_prefix:])
            if reshape:
                patches = patches.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            outputs.append((patches, prefix[:, 0]) if return_class_token else patches)
        return tuple(outputs)

    def get_last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of the cls token to each patch in the last block, per head: [B, heads, N] (rows sum to < 1,
        the rest goes to the cls and storage tokens)."""
        t, rope = self._tokens(x, None)
        for block in self.blocks[:-1]:
            t = block(t, rope)
        last = self.blocks[-1]
        return last.attn.cls_attention(last.norm1(t), rope)[:, :, 1 + self.n_storage_tokens :]


def build_vit(arch: str, **kwargs) -> DinoVisionTransformer:
    """A ViT of a named size; kwargs override the size and the DinoVisionTransformer defaults."""
    if arch not in ARCHS:
        closest = difflib.get_close_matches(arch, ARCHS, n=1, cutoff=0.0)
        raise ValueError(f"unknown ViT arch {arch!r}; expected one of {sorted(ARCHS)} (closest: {closest[0]!r})")
    return DinoVisionTransformer(**{**ARCHS[arch], **kwargs})
