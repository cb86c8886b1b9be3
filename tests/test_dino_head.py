"""DINOHead: shapes, DINOv3 parameter names, unit-norm bottleneck, initialisation."""

from __future__ import annotations

import pytest
import torch

from dinocell.layers.dino_head import DINOHead


def test_output_shape_and_parameter_names():
    head = DINOHead(in_dim=12, out_dim=40, hidden_dim=16, bottleneck_dim=8, nlayers=3)
    assert head(torch.randn(5, 12)).shape == (5, 40)
    assert [(name, tuple(p.shape)) for name, p in head.named_parameters()] == [
        ("mlp.0.weight", (16, 12)),
        ("mlp.0.bias", (16,)),
        ("mlp.2.weight", (16, 16)),
        ("mlp.2.bias", (16,)),
        ("mlp.4.weight", (8, 16)),
        ("mlp.4.bias", (8,)),
        ("last_layer.weight", (40, 8)),
    ]
    assert [n for n, _ in DINOHead(12, 40, 16, 8, nlayers=1).named_parameters()] == [
        "mlp.weight",
        "mlp.bias",
        "last_layer.weight",
    ]


def test_bottleneck_is_unit_norm_before_last_layer():
    head = DINOHead(in_dim=12, out_dim=40, hidden_dim=16, bottleneck_dim=8, nlayers=2)
    seen = {}

    def keep_input(module, inputs, output) -> None:
        seen["x"] = inputs[0]

    head.last_layer.register_forward_hook(keep_input)
    out = head(torch.randn(6, 12) * 30)
    torch.testing.assert_close(seen["x"].norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(out, seen["x"] @ head.last_layer.weight.t())  # last layer: no bias, no weight norm


def test_init_is_truncated_normal_with_zero_biases():
    torch.manual_seed(0)
    head = DINOHead(in_dim=64, out_dim=2048, hidden_dim=128, bottleneck_dim=64, nlayers=3)
    w = head.last_layer.weight
    # like DINOv3: trunc_normal_(std=0.02) with its default cut at +-2 (absolute), i.e. in effect N(0, 0.02^2)
    assert w.std().item() == pytest.approx(0.02, rel=0.03)
    assert w.mean().abs().item() < 0.001
    assert all(torch.count_nonzero(b) == 0 for n, b in head.named_parameters() if n.endswith("bias"))


def test_rejects_zero_layers():
    with pytest.raises(ValueError, match="nlayers must be >= 1, got 0"):
        DINOHead(in_dim=4, nlayers=0)
