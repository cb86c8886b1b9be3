"""ResNet backbones: torchvision's architecture and files, channel adaptation, the backbone interface, bad inputs."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from dinocell.models import RESNET_ARCHS, WeightsError, build_backbone, load_pretrained


def _torchvision_resnet18(seed: int = 0) -> nn.Module:
    """A torchvision resnet18 with random weights and random BatchNorm statistics (so no layer is an identity)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return model.eval()


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's pooled feature: its forward with the classifier replaced by the identity."""
    fc, model.fc = model.fc, nn.Identity()
    try:
        return model(x)
    finally:
        model.fc = fc


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory) -> tuple[nn.Module, str]:
    model = _torchvision_resnet18()
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(model.state_dict(), path)  # the layout of torchvision's published files (fc included)
    return model, str(path)


@pytest.mark.parametrize("in_chans", [1, 4, 408])
def test_channel_adapted_resnet_on_replicated_grey_equals_rgb_model(torchvision_file, in_chans) -> None:
    reference, path = torchvision_file
    model = build_backbone("resnet18", in_chans=in_chans).eval()
    report = load_pretrained(model, path)
    assert report.layout == "torchvision ResNet" and (report.missing, report.unexpected) == ([], [])
    assert report.adapted == [
        "fc.bias, fc.weight: classifier dropped (the backbone ends at its pooled feature)",
        f"conv1.weight: 3 -> {in_chans} channels (mean kernel x 3/{in_chans})",
    ]
    grey = torch.rand(2, 1, 64, 64)
    expected = _features(reference, grey.expand(-1, 3, -1, -1))
    with torch.no_grad():
        torch.testing.assert_close(model(grey.expand(-1, in_chans, -1, -1)), expected, rtol=1e-4, atol=1e-5)
        # training mode (BatchNorm on batch statistics, which amplify fp32 rounding: checked in float64); on a copy,
        # as a training forward updates the running statistics
        reference64 = copy.deepcopy(reference).double().train()
        model64 = build_backbone("resnet18", in_chans=in_chans).double().train()
        load_pretrained(model64, reference64.state_dict())
        grey = grey.double()
        torch.testing.assert_close(
            model64(grey.expand(-1, in_chans, -1, -1)), _features(reference64, grey.expand(-1, 3, -1, -1)),
            rtol=1e-9, atol=1e-12,
        )


def test_torchvision_file_loads_losslessly_into_the_same_architecture(torchvision_file) -> None:
    reference, path = torchvision_file
    model = build_backbone("resnet18").eval()
    report = load_pretrained(model, path)
    assert report.adapted == [
        "fc.bias, fc.weight: classifier dropped (the backbone ends at its pooled feature)"
    ]
    ref_state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert model.state_dict().keys() == ref_state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref_state.items())
    x = torch.rand(3, 3, 96, 80)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _features(reference, x), rtol=0, atol=0)


def test_file_without_batchnorm_counters_loads(torchvision_file) -> None:
    """Older torchvision files predate num_batches_tracked: the counters are kept from the backbone."""
    reference, _ = torchvision_file
    old = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    report = load_pretrained(build_backbone("resnet18"), old)
    counters = [a for a in report.adapted if "num_batches_tracked" in a]
    assert len(counters) == 20 and report.missing == []  # resnet18: 20 BatchNorm layers


def test_resnet_student_checkpoint_loads_and_adapts_channels() -> None:
    torch.manual_seed(0)
    student = build_backbone("resnet18", in_chans=5).eval()
    checkpoint = {
        "model": {**{f"student.backbone.{k}": v for k, v in student.state_dict().items()},
                  "student.projection_head.0.weight": torch.zeros(4, 512)},
        "iteration": 10,
    }
    same = build_backbone("resnet18", in_chans=5).eval()
    report = load_pretrained(same, checkpoint)
    assert report.layout == "training checkpoint (student.backbone)" and report.adapted == []
    x = torch.rand(2, 5, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(same(x), student(x), rtol=0, atol=0)
    grey = build_backbone("resnet18", in_chans=1).eval()
    report = load_pretrained(grey, checkpoint)
    assert report.adapted == ["conv1.weight: 5 -> 1 channels (mean kernel x 5/1)"]
    g = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(g), student(g.expand(-1, 5, -1, -1)), rtol=1e-4, atol=1e-5)


def test_mismatched_weights_are_named() -> None:
    with torch.device("meta"):
        resnet50 = torchvision.models.resnet50().state_dict()
        resnet34 = torchvision.models.resnet34().state_dict()
    with pytest.raises(WeightsError, match=r"holds resnet50 weights but the backbone is resnet18; set "
                                           r"student.arch=resnet50 \(`--arch resnet50` for dinocell knn\)"):
        load_pretrained(build_backbone("resnet18"), resnet50)
    with pytest.raises(ValueError, match=r"holds a ResNet of BasicBlock blocks \(3, 4, 6, 3\) weights .* supported: "):
        load_pretrained(build_backbone("resnet18"), resnet34)
    with pytest.raises(ValueError, match=r"no ResNet stem \(conv1.weight\): it holds ViT weights"):
        load_pretrained(build_backbone("resnet18"), build_backbone("vit_test").state_dict())
    with pytest.raises(WeightsError, match=r"holds ResNet weights \(resnet50\), but the backbone is a ViT; set "
                                           r"student.arch=resnet50"):
        load_pretrained(build_backbone("vit_test"), resnet50)


@pytest.mark.parametrize(("arch", "dim", "params"), [("resnet18", 512, 11_176_512), ("resnet50", 2048, 23_508_032),
                                                      ("resnet101", 2048, 42_500_160)])
def test_archs_are_torchvisions_without_classifier(arch, dim, params) -> None:
    with torch.device("meta"):
        model = build_backbone(arch)
        reference = getattr(torchvision.models, arch)()
    assert model.embed_dim == dim and model.in_chans == 3
    ref_keys = [k for k in reference.state_dict() if not k.startswith("fc.")]
    assert list(model.state_dict()) == ref_keys
    # parameters: torchvision's minus the 1000-class classifier
    assert sum(p.numel() for p in model.parameters()) == params
    assert params == sum(p.numel() for p in reference.parameters()) - (dim * 1000 + 1000)
    assert set(RESNET_ARCHS) == {"resnet18", "resnet50", "resnet101"}


def test_forward_features_interface_and_grouped_batchnorm() -> None:
    torch.manual_seed(0)
    model = build_backbone("resnet18", in_chans=2).train()
    a, b, small = torch.rand(3, 2, 64, 64), torch.rand(2, 2, 64, 64), torch.rand(4, 2, 32, 32)
    outs = model.forward_features([a, b, small])
    assert [o["x_norm_clstoken"].shape for o in outs] == [(3, 512), (2, 512), (4, 512)]
    assert [o["x_feature_map"].shape for o in outs] == [(3, 512, 2, 2), (2, 512, 2, 2), (4, 512, 1, 1)]
    assert all(o["masks"] is None for o in outs)
    # same-shape batches run as one batch (BatchNorm statistics over both), the other one on its own
    together = model.forward_features(torch.cat([a, b]))
    torch.testing.assert_close(torch.cat([outs[0]["x_norm_clstoken"], outs[1]["x_norm_clstoken"]]),
                               together["x_norm_clstoken"])
    alone = model.forward_features(a)["x_norm_clstoken"]
    assert not torch.allclose(alone, outs[0]["x_norm_clstoken"], atol=1e-4)  # batch statistics differ
    torch.testing.assert_close(model.forward_features(small)["x_norm_clstoken"], outs[2]["x_norm_clstoken"])
    model.eval()
    with torch.no_grad():
        out = model.forward_features(a)
        torch.testing.assert_close(out["x_norm_clstoken"], model(a))
        torch.testing.assert_close(out["x_norm_clstoken"], out["x_feature_map"].mean(dim=(2, 3)))


def test_bad_inputs_are_named() -> None:
    model = build_backbone("resnet18", in_chans=4)
    with pytest.raises(ValueError, match=r"resnet18: expected images \[B, 4, H, W\] \(4 input channels, in_chans\), "
                                         r"got shape \[2, 3, 32, 32\]"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"resnet18 has no patch tokens, so it takes no iBOT masks"):
        model.forward_features([torch.rand(2, 4, 32, 32)], masks=[torch.zeros(2, 4, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"resnet18 takes only in_chans, got also \['n_storage_tokens', "
                                         r"'patch_size'\]: these are ViT options"):
        build_backbone("resnet18", patch_size=16, n_storage_tokens=4)
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet19'.*closest 'resnet18'"):
        build_backbone("resnet19")
    with pytest.raises(ValueError, match=r"in_chans >= 1"):
        build_backbone("resnet50", in_chans=0)
