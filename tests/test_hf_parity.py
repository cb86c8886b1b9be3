"""Parity with Hugging Face transformers' DINOv3ViTModel: same random weights -> same features (fp32, eval)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dinocell.models import build_backbone, load_pretrained  # noqa: E402


def _random_hf_model(gated: bool, n_registers: int) -> "transformers.DINOv3ViTModel":
    config = transformers.DINOv3ViTConfig(
        patch_size=8,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_act="silu" if gated else "gelu",
        use_gated_mlp=gated,
        num_register_tokens=n_registers,
        layerscale_value=1.0,
        image_size=32,
    )
    torch.manual_seed(0)
    model = transformers.DINOv3ViTModel(config).eval()
    with torch.no_grad():  # randomise everything (LayerNorms, LayerScale, tokens too) so every weight is exercised
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize(
    ("gated", "n_registers"), [(False, 0), (False, 4), (True, 4)], ids=["mlp", "mlp-storage", "swiglu-storage"]
)
@pytest.mark.parametrize("via", ["directory", "sharded_directory", "state_dict"])
def test_matches_transformers_dinov3(tmp_path, gated: bool, n_registers: int, via: str) -> None:
    hf = _random_hf_model(gated, n_registers)
    ours = build_backbone(
        "vit_test",
        patch_size=8,
        n_storage_tokens=n_registers,
        ffn_layer="swiglu" if gated else "mlp",
        ffn_ratio=6.0 if gated else 4.0,  # SwiGLU: int(32*6*2/3) = 128 = the HF intermediate_size
        layerscale_init=1.0,
    ).eval()
    if via.endswith("directory"):
        hf.save_pretrained(tmp_path, max_shard_size="20KB" if via == "sharded_directory" else "5GB")
        assert (tmp_path / "model.safetensors.index.json").is_file() == (via == "sharded_directory")
        source = tmp_path
    else:
        source = hf.state_dict()
    report = load_pretrained(ours, source)
    assert report.layout == "hugging face DINOv3ViTModel"
    assert report.missing == [] and report.unexpected == []
    assert any("rope_embed.periods" in a for a in report.adapted)

    x = torch.randn(3, 3, 48, 32)  # non-square on purpose: RoPE normalises each axis separately
    masks = torch.rand(3, 24) < 0.4
    with torch.no_grad():
        ref = hf(pixel_values=x, bool_masked_pos=masks).last_hidden_state
        out = ours.forward_features(x, masks)
    assert torch.allclose(out["x_norm_clstoken"], ref[:, 0], atol=1e-5, rtol=0)
    assert torch.allclose(out["x_storage_tokens"], ref[:, 1 : 1 + n_registers], atol=1e-5, rtol=0)
    assert torch.allclose(out["x_norm_patchtokens"], ref[:, 1 + n_registers :], atol=1e-5, rtol=0)
    assert out["x_norm_patchtokens"].abs().max() > 0.1  # features are not trivially small
