"""The DINOv3 ViT backbone: sizes, official layout, forward outputs, masking, RoPE, init, and input errors."""

import copy
import math

import pytest
import torch

from dinocell.layers import DropPath, RopePositionEmbedding, apply_rope
from dinocell.models import ARCHS, build_backbone


def _official_vits16_keys() -> dict[str, tuple[int, ...]]:
    """The 188 entries of the official dinov3_vits16 backbone file (FACTS section 1)."""
    keys = {
        "cls_token": (1, 1, 384),
        "storage_tokens": (1, 4, 384),
        "mask_token": (1, 384),
        "patch_embed.proj.weight": (384, 3, 16, 16),
        "patch_embed.proj.bias": (384,),
        "rope_embed.periods": (16,),
        "norm.weight": (384,),
        "norm.bias": (384,),
    }
    for i in range(12):
        b = f"blocks.{i}."
        keys |= {
            b + "norm1.weight": (384,),
            b + "norm1.bias": (384,),
            b + "attn.qkv.weight": (1152, 384),
            b + "attn.qkv.bias": (1152,),
            b + "attn.qkv.bias_mask": (1152,),
            b + "attn.proj.weight": (384, 384),
            b + "attn.proj.bias": (384,),
            b + "ls1.gamma": (384,),
            b + "norm2.weight": (384,),
            b + "norm2.bias": (384,),
            b + "mlp.fc1.weight": (1536, 384),
            b + "mlp.fc1.bias": (1536,),
            b + "mlp.fc2.weight": (384, 1536),
            b + "mlp.fc2.bias": (384,),
            b + "ls2.gamma": (384,),
        }
    return keys


def test_vit_small_has_the_official_layout_and_21_6m_parameters() -> None:
    model = build_backbone("vit_small", device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 188
    assert shapes == _official_vits16_keys()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 21_601_152
    assert round(n_params / 1e6, 1) == 21.6
    assert (model.embed_dim, model.n_blocks, model.num_heads, model.patch_size) == (384, 12, 6, 16)
    assert (model.in_chans, model.n_storage_tokens, len(model.blocks)) == (3, 4, 12)


@pytest.mark.parametrize(
    ("arch", "published_millions", "ffn_hidden"),
    [
        ("vit_small_plus", 29, 1536),
        ("vit_base", 86, 3072),
        ("vit_large", 300, 4096),
        ("vit_huge_plus", 840, 5120),
        ("vit_7b", 6700, 8192),
    ],
)
def test_published_sizes(arch: str, published_millions: int, ffn_hidden: int) -> None:
    model = build_backbone(arch, device="meta")
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n_params - published_millions) / published_millions < 0.015, n_params
    mlp = model.blocks[0].mlp
    assert (mlp.w1 if hasattr(mlp, "w1") else mlp.fc1).out_features == ffn_hidden


def test_builds_under_a_meta_default_device() -> None:
    """FSDP builds large models under `with torch.device("meta")` (no device argument): nothing may need data."""
    with torch.device("meta"):
        model = build_backbone("vit_7b", drop_path_rate=0.4)
    assert {p.device.type for p in [*model.parameters(), *model.buffers()]} == {"meta"}
    rates = [block.drop_path.drop_prob for block in model.blocks[1:]]
    assert model.blocks[0].drop_path is None and rates[-1] == pytest.approx(0.4)  # rate 0: no drop path
    assert rates == sorted(rates) and rates[0] == pytest.approx(0.4 / 39)


def test_patch_8_gives_784_tokens_at_224() -> None:
    model = build_backbone("vit_small", patch_size=8, device="meta")
    out = model.forward_features(torch.empty(2, 3, 224, 224, device="meta"))
    assert out["x_norm_patchtokens"].shape == (2, 784, 384)
    assert out["x_prenorm"].shape == (2, 1 + 4 + 784, 384)


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vit_test", in_chans=5, patch_size=8, layerscale_init=1.0).eval()  # blocks matter at init


def test_forward_features_shapes_and_forward_is_the_cls_token(tiny) -> None:
    x = torch.randn(3, 5, 32, 48)
    out = tiny.forward_features(x)
    assert out["x_norm_clstoken"].shape == (3, 32)
    assert out["x_storage_tokens"].shape == (3, 4, 32)
    assert out["x_norm_patchtokens"].shape == (3, 4 * 6, 32)
    assert out["x_prenorm"].shape == (3, 1 + 4 + 24, 32)
    assert out["masks"] is None
    # normalised tokens are LayerNorm(x_prenorm)
    assert torch.allclose(out["x_norm_clstoken"], tiny.norm(out["x_prenorm"][:, 0]), atol=1e-6)
    assert torch.equal(tiny(x), out["x_norm_clstoken"])


def test_list_forward_equals_separate_forwards(tiny) -> None:
    crops = [torch.randn(2, 5, 32, 32), torch.randn(4, 5, 16, 16)]
    masks = [torch.rand(2, 16) < 0.5, None]
    together = tiny.forward_features(crops, masks)
    assert len(together) == 2
    for crop, mask, out in zip(crops, masks, together):
        alone = tiny.forward_features(crop, mask)
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
            assert torch.allclose(out[key], alone[key], atol=1e-6), key
        assert out["masks"] is mask


def test_masked_patches_are_replaced_by_the_mask_token(tiny) -> None:
    x1, x2 = torch.randn(1, 5, 32, 32), torch.randn(1, 5, 32, 32)
    all_masked = torch.ones(1, 16, dtype=torch.bool)
    a = tiny.forward_features(x1, all_masked)
    b = tiny.forward_features(x2, all_masked)
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        assert torch.allclose(a[key], b[key], atol=1e-6)  # nothing of the image is left
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.mask_token.normal_()  # the token itself goes in (not zeros): another token, another output
    with_token = other.forward_features(x1, all_masked)["x_norm_clstoken"]
    assert not torch.allclose(with_token, a["x_norm_clstoken"], atol=1e-3)
    some = torch.zeros(1, 16, dtype=torch.bool)
    some[0, 3] = True
    assert not torch.allclose(tiny.forward_features(x1, some)["x_norm_clstoken"], tiny(x1), atol=1e-4)


def test_mask_token_gets_a_gradient_even_without_masks() -> None:
    """DDP needs every parameter in the graph; mask_token joins with weight 0 when no mask is given."""
    model = build_backbone("vit_test")
    model(torch.randn(1, 3, 16, 16)).sum().backward()
    assert model.mask_token.grad is not None and torch.all(model.mask_token.grad == 0)


def test_intermediate_layers(tiny) -> None:
    x = torch.randn(2, 5, 32, 40)
    last = tiny.get_intermediate_layers(x)
    assert len(last) == 1
    assert torch.allclose(last[0], tiny.forward_features(x)["x_norm_patchtokens"], atol=1e-6)
    maps = tiny.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    assert [m[0].shape for m in maps] == [(2, 32, 4, 5)] * 2
    assert [m[1].shape for m in maps] == [(2, 32)] * 2
    assert torch.allclose(maps[1][1], tiny(x), atol=1e-6)
    # reshape keeps row-major patch order: token (r, c) -> map [:, :, r, c]
    assert torch.equal(maps[1][0][:, :, 1, 3], last[0][:, 1 * 5 + 3])
    raw = tiny.get_intermediate_layers(x, n=[0], norm=False)[0]
    assert not torch.allclose(raw, tiny.get_intermediate_layers(x, n=[0])[0], atol=1e-3)
    picked = tiny.get_intermediate_layers(x, n=[1, 0, 1])  # order asked for, repeats kept
    assert len(picked) == 3 and torch.equal(picked[0], picked[2]) and torch.equal(picked[0], last[0])
    assert torch.equal(picked[1], tiny.get_intermediate_layers(x, n=[0])[0])
    with pytest.raises(ValueError, match=r"block indices must be in \[0, 1\]"):
        tiny.get_intermediate_layers(x, n=3)


def test_last_self_attention_of_the_cls_token(tiny) -> None:
    x = torch.randn(2, 5, 32, 32)
    attn = tiny.get_last_self_attention(x)
    assert attn.shape == (2, 2, 16)
    assert torch.all(attn > 0) and torch.all(attn.sum(-1) < 1)
    # the full cls row (prefix tokens + patches) is a softmax: it sums to 1
    t, rope = tiny._tokens(x, None)
    t = tiny.blocks[0](t, rope)
    full = tiny.blocks[1].attn.cls_attention(tiny.blocks[1].norm1(t), rope)
    assert torch.allclose(full.sum(-1), torch.ones(2, 2), atol=1e-6)
    assert torch.allclose(full[:, :, 5:], attn, atol=1e-7)


def test_init_weights_matches_the_reference() -> None:
    torch.manual_seed(0)
    model = build_backbone("vit_small", layerscale_init=1e-5, device="meta")
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.all(model.mask_token == 0)
    assert 0.015 < model.storage_tokens.std().item() < 0.025
    qkv = model.blocks[3].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 0.0005  # truncated at +-2 (absolute, as the reference): ~N(0, 0.02)
    assert torch.all(qkv.bias == 0)
    assert torch.equal(qkv.bias_mask, torch.cat([torch.ones(384), torch.zeros(384), torch.ones(384)]))
    assert torch.all(model.blocks[0].ls1.gamma == 1e-5) and torch.all(model.blocks[11].ls2.gamma == 1e-5)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    bound = 1 / math.sqrt(3 * 16 * 16)
    assert model.patch_embed.proj.weight.abs().max() <= bound
    assert torch.allclose(model.rope_embed.periods, 100.0 ** (torch.arange(16) / 16))


def test_layerscale_none_disables_it_and_untied_norm_adds_cls_norm() -> None:
    model = build_backbone("vit_test", layerscale_init=None, untie_cls_and_patch_norms=True)
    keys = model.state_dict().keys()
    assert not any(".ls1." in k or ".ls2." in k for k in keys)
    assert {"cls_norm.weight", "cls_norm.bias"} <= set(keys)
    with torch.no_grad():
        model.cls_norm.bias.fill_(3.0)
    out = model.forward_features(torch.randn(1, 3, 16, 16))
    assert torch.allclose(out["x_norm_clstoken"].mean(), torch.tensor(3.0), atol=1e-5)
    assert out["x_norm_patchtokens"].mean().abs() < 1e-5


def test_local_cls_norm_applies_to_the_second_crop_batch_in_training_only() -> None:
    model = build_backbone("vit_test", untie_global_and_local_cls_norm=True)
    with torch.no_grad():
        model.local_cls_norm.bias.fill_(3.0)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    train_out = model.train().forward_features(crops)
    eval_out = model.eval().forward_features(crops)
    assert torch.allclose(train_out[1]["x_norm_clstoken"].mean(), torch.tensor(3.0), atol=1e-5)
    assert torch.allclose(train_out[1]["x_storage_tokens"].mean(), torch.tensor(3.0), atol=1e-5)
    for out in (train_out[0], eval_out[0], eval_out[1]):
        assert out["x_norm_clstoken"].mean().abs() < 1e-5


def test_vit_7b_matches_the_released_layout() -> None:
    keys = build_backbone("vit_7b", device="meta").state_dict().keys()
    assert {"local_cls_norm.weight", "local_cls_norm.bias", "blocks.39.mlp.w3.weight"} <= set(keys)
    assert "blocks.0.attn.qkv.bias" not in keys and "blocks.0.attn.qkv.bias_mask" not in keys


def test_rope_rotates_only_patch_tokens_and_keeps_norms() -> None:
    rope = RopePositionEmbedding(embed_dim=64, num_heads=2)
    sin, cos = rope(3, 4)
    assert sin.shape == cos.shape == (12, 32)
    q = torch.randn(2, 2, 5 + 12, 32)
    rotated = apply_rope(q, sin, cos)
    assert torch.equal(rotated[:, :, :5], q[:, :, :5])
    assert torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    assert not torch.allclose(rotated[:, :, 5:], q[:, :, 5:])
    # first frequency (period 1) of the y axis: angle = 2 pi y with y the normalised centre of row 0 = -2/3
    assert torch.allclose(sin[0, 0], torch.tensor(math.sin(2 * math.pi * (-2 / 3))), atol=1e-6)


def test_rope_augmentations_only_in_training() -> None:
    rope = RopePositionEmbedding(embed_dim=64, num_heads=2, shift_coords=0.5, jitter_coords=1.5, rescale_coords=2.0)
    rope.eval()
    assert torch.equal(rope(4, 4)[0], rope(4, 4)[0])
    plain = RopePositionEmbedding(embed_dim=64, num_heads=2).eval()(4, 4)[0]
    assert torch.equal(rope(4, 4)[0], plain)
    rope.train()
    assert not torch.allclose(rope(4, 4)[0], plain)


def test_drop_path_only_in_training() -> None:
    model = build_backbone("vit_test", drop_path_rate=0.5, layerscale_init=1.0)  # residuals large enough to see
    assert [b.drop_path.drop_prob for b in model.blocks[1:]] == [0.5]  # linear ramp 0 .. 0.5
    x = torch.randn(8, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    assert not torch.allclose(model(x), model(x), atol=1e-3)
    drop = DropPath(0.25).train()
    y = drop(torch.ones(20000, 1))
    assert torch.all((y == 0) | torch.isclose(y, torch.tensor(1 / 0.75)))
    assert abs(y.mean().item() - 1.0) < 0.03
    with pytest.raises(ValueError, match=r"\[0, 1\), got 1.0"):
        DropPath(1.0)


def test_bad_inputs_raise_clear_errors(tiny) -> None:
    with pytest.raises(ValueError, match=r"expected 5 input channels \(in_chans\), got 3"):
        tiny(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"image size 30x32 is not divisible by the patch size 8; closest valid "
                                         r"size is 32x32"):
        tiny(torch.randn(1, 5, 30, 32))
    with pytest.raises(ValueError, match=r"expected an image batch \[B, C, H, W\]"):
        tiny(torch.randn(5, 32, 32))
    with pytest.raises(ValueError, match=r"unknown architecture 'vit_smal'; expected one of .*closest 'vit_small'"):
        build_backbone("vit_smal")
    with pytest.raises(ValueError, match=r"head_dim .* divisible by 4, got 36/6 = 6"):
        build_backbone("vit_test", embed_dim=36, num_heads=6)
    with pytest.raises(ValueError, match=r"embed_dim 36 must be divisible by num_heads 5"):
        build_backbone("vit_test", embed_dim=36, num_heads=5)
    with pytest.raises(ValueError, match=r"unknown ffn_layer 'glu'"):
        build_backbone("vit_test", ffn_layer="glu")
    with pytest.raises(ValueError, match=r"masks must be bool \[B, N\] = \[1, 16\], got torch.bool \[1, 15\]"):
        tiny.forward_features(torch.randn(1, 5, 32, 32), torch.ones(1, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="got 2 crop batches but 1 masks"):
        tiny.forward_features([torch.randn(1, 5, 32, 32)] * 2, [None])


def test_every_arch_is_buildable_by_name() -> None:
    assert set(ARCHS) == {
        "vit_test", "vit_tiny", "vit_small", "vit_small_plus", "vit_base", "vit_large", "vit_huge_plus", "vit_7b"
    }
    model = build_backbone("vit_tiny", patch_size=14, in_chans=6, n_storage_tokens=0, device="meta")
    assert (model.embed_dim, model.n_blocks, model.num_heads) == (192, 12, 3)
    assert model.patch_embed.proj.weight.shape == (192, 6, 14, 14)
    assert model.storage_tokens.shape == (1, 0, 192)
