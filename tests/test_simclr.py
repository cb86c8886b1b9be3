"""SimCLR (method simclr): the meta-architecture, its two-view batches, head, optimiser groups, eval dumps, and what
gradient accumulation means for it; plus the refusal of DINO on a ResNet."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinocell.config import load_config
from dinocell.data import make_dataset
from dinocell.layers.projection_head import ProjectionHead
from dinocell.models import build_backbone, load_pretrained
from dinocell.pipeline.loaders import build_ssl_loader_from_config
from dinocell.train.checkpoint import save_eval_dump
from dinocell.train.meta_arch import SSLMetaArch
from dinocell.train.methods import build_method
from dinocell.train.optim import build_optimizer, param_groups
from dinocell.train.schedules import build_schedules
from dinocell.train.simclr import SimCLRMetaArch
from dinocell.train.step import TrainStep

VIT = [  # a BN-free backbone with deterministic forwards (no drop path, no RoPE augmentation)
    "method=simclr", "student.arch=vit_test", "student.patch_size=8", "student.n_storage_tokens=1",
    "student.in_chans=5", "student.layerscale=0.1", "student.pos_embed_rope_rescale_coords=null",
    "crops.global_crops_size=16", "crops.local_crops_number=0", "simclr.head_hidden_dim=32", "simclr.head_out_dim=16",
    "train.dataset_path=SyntheticCellPainting:size=16:image_size=32", "train.batch_size_per_gpu=4",
    "train.num_workers=0",
]


def _cfg(*extra: str):
    return load_config(overrides=VIT + list(extra))


def _batches(cfg, n: int) -> list:
    loader = build_ssl_loader_from_config(
        cfg, make_dataset(cfg.train.dataset_path), rank=0, world_size=1, start_iter=0
    )
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Independent reference: each view's log-probability of its partner among all other views, float64."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    sim = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    n = len(z1)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return -(sim[torch.arange(2 * n), partner] - sim.logsumexp(dim=1)).mean()


def test_two_view_batches_and_a_student_without_teacher():
    cfg = _cfg()
    (batch,) = _batches(cfg, 1)
    assert batch.global_crops.shape == (8, 5, 16, 16) and batch.n_local_crops == 0 and batch.local_crops.shape[0] == 0
    assert batch.masks.shape == (8, 0) and batch.mask_indices.numel() == 0  # no iBOT masks for SimCLR
    torch.manual_seed(0)
    model = build_method(cfg)
    assert isinstance(model, SimCLRMetaArch) and model.SCHEDULED_INPUTS == ()
    prefixes = {".".join(k.split(".")[:2]) for k in model.state_dict()}
    assert prefixes == {"student.backbone", "student.projection_head"}
    assert model.eval_backbone() is model.student.backbone
    assert set(build_schedules(cfg, peak_lr=1e-3).at(0)) == {"lr", "weight_decay"}  # no teacher schedules


def test_loss_is_nt_xent_of_both_views_in_one_forward_so_batchnorm_statistics_are_shared():
    cfg = _cfg("simclr.head_batchnorm=true", "simclr.temperature=0.2")
    (batch,) = _batches(cfg, 1)
    torch.manual_seed(0)
    model = build_method(cfg).train()
    out = model(batch)
    assert set(out.terms) == {"nt_xent_loss"} and out.updates == {} and out.terms["nt_xent_loss"] == out.loss
    net = model.student
    with torch.no_grad():
        z = net.projection_head(net.backbone.forward_features(batch.global_crops)["x_norm_clstoken"])
        joint = _nt_xent(z[:4], z[4:], 0.2)
        z1, z2 = (net.projection_head(net.backbone(view)) for view in batch.global_crops.chunk(2))
        per_view = _nt_xent(z1, z2, 0.2)
    assert out.loss.item() == pytest.approx(joint.item(), abs=1e-5)
    assert abs(per_view.item() - joint.item()) > 1e-3  # per-view BatchNorm statistics would give another loss


def test_projection_head_layers():
    head = ProjectionHead(8, out_dim=4, hidden_dim=16, nlayers=3, batchnorm=True)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head.mlp[0].bias is None and head.mlp[-1].bias is not None  # BatchNorm's shift replaces the bias
    plain = ProjectionHead(8, out_dim=4, hidden_dim=16, nlayers=2, batchnorm=False)
    assert [type(m).__name__ for m in plain.mlp] == ["Linear", "ReLU", "Linear"]
    assert plain(torch.ones(3, 8)).shape == (3, 4)
    assert [type(m).__name__ for m in ProjectionHead(8, nlayers=1).mlp] == ["Linear"]
    with pytest.raises(ValueError, match="nlayers must be >= 1"):
        ProjectionHead(8, nlayers=0)


def test_resnet_parameter_groups_count_stages_as_layers():
    cfg = load_config(overrides=["method=simclr", "student.arch=resnet18", "crops.local_crops_number=0",
                                 "simclr.head_hidden_dim=16"])
    model = build_method(cfg)
    assert model.student.backbone.n_blocks == 4
    groups = param_groups(model.student, n_blocks=4, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    lr_of = {name: g["lr_multiplier"] for g in groups for name in g["names"]}
    wd_of = {name: g["wd_multiplier"] for g in groups for name in g["names"]}
    assert lr_of["backbone.conv1.weight"] == lr_of["backbone.bn1.weight"] == 0.5**5  # the stem is layer 0
    assert lr_of["backbone.layer1.0.conv1.weight"] == 0.5**4 and lr_of["backbone.layer4.1.bn2.bias"] == 0.5
    assert lr_of["projection_head.mlp.0.weight"] == 1.0
    assert wd_of["backbone.layer2.0.conv1.weight"] == 1.0 and wd_of["backbone.layer2.0.bn1.weight"] == 0.0
    assert not any(g["is_last_layer"] for g in groups)  # nothing follows the DINO last-layer schedule
    assert sum(len(g["params"]) for g in groups) == len(list(model.student.parameters()))


def test_eval_dump_and_checkpoint_load_into_a_backbone(tmp_path):
    cfg = load_config(overrides=["method=simclr", "student.arch=resnet18", "crops.local_crops_number=0",
                                 "simclr.head_hidden_dim=16"])
    torch.manual_seed(0)
    model = build_method(cfg)
    with torch.no_grad():
        model.student.backbone.layer1[0].bn1.running_mean.add_(0.5)  # a trained-looking buffer
    path = save_eval_dump(tmp_path / "eval" / "final", model.eval_dump())
    assert path.name == "student_checkpoint.pth"
    for source in (path, path.parent, {"model": model.state_dict()}):  # file, eval directory, training checkpoint
        backbone = build_backbone("resnet18", in_chans=5)
        report = load_pretrained(backbone, source)
        assert "student.backbone" in report.layout
        for name, value in model.student.backbone.state_dict().items():
            assert torch.equal(backbone.state_dict()[name], value), name


def test_dino_refuses_a_resnet_with_the_way_out():
    with pytest.raises(ValueError, match=r"student\.arch='resnet50' with method=dino: DINO \+ iBOT needs a ViT.*"
                                         r"use method=simclr with a ResNet"):
        SSLMetaArch(load_config(overrides=["student.arch=resnet50"]))


def test_accumulated_step_averages_the_micro_batch_gradients():
    """k micro-batches: the gradient is the mean of each micro-batch's own NT-Xent gradient (negatives from the
    micro-batch), which is NOT the gradient of one k-times larger batch (more negatives)."""
    cfg = _cfg("simclr.head_batchnorm=false")
    micro = _batches(cfg, 2)
    torch.manual_seed(0)
    model = build_method(cfg).train()
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(param_groups(model.student, n_blocks=model.student.backbone.n_blocks,
                                             layerwise_decay=1.0, patch_embed_lr_mult=1.0), cfg.optim)
    step = TrainStep(model, optimizer, device=torch.device("cpu"), clip_grad=0.0, autocast_dtype="fp32")
    result = step(micro, {"lr": 0.0, "weight_decay": 0.0})
    losses = [reference(batch).loss for batch in micro]
    assert result.loss.item() == pytest.approx(sum(loss.item() for loss in losses) / 2, abs=1e-6)
    expected = torch.autograd.grad(sum(losses) / 2, list(reference.student.parameters()))
    for (name, p), g in zip(model.student.named_parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)

    crops = [torch.cat([b.global_crops[:4] for b in micro]), torch.cat([b.global_crops[4:] for b in micro])]
    z1, z2 = (reference.student(c) for c in crops)  # the same 8 images as one batch: 14 negatives per view, not 6
    assert abs(_nt_xent(z1, z2, 0.1).item() - result.loss.item()) > 1e-3


def test_sync_batchnorm_is_left_out_without_cuda(monkeypatch):
    """gloo on CPU has no SyncBatchNorm: each process keeps its BatchNorm, and the log says so."""
    from dinocell import distributed

    monkeypatch.setattr(distributed, "is_enabled", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    warnings = []
    monkeypatch.setattr(logging.getLogger("dinocell"), "warning", lambda msg, *args: warnings.append(msg % args))
    model = SimCLRMetaArch(_cfg("simclr.head_batchnorm=true"))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert len(warnings) == 1 and "SyncBatchNorm needs CUDA" in warnings[0]
