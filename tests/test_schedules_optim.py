"""Schedules (exact values), lr scaling, and which parameter gets which lr / weight decay."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from dinocell.config import load_config
from dinocell.config.schema import OptimConfig
from dinocell.train.optim import apply_schedule, build_optimizer, param_groups
from dinocell.train.schedules import build_schedules, warmup_constant, warmup_cosine


def test_warmup_cosine_values():
    values = warmup_cosine(0.0, 1.0, 0.0, warmup_iters=2, total_iters=6)
    c = math.cos(math.pi / 4)
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.5 * (1 + c), 0.5, 0.5 * (1 - c)], atol=1e-12)


def test_warmup_constant_values():
    np.testing.assert_allclose(
        warmup_constant(0.04, 0.07, warmup_iters=3, total_iters=5), [0.04, 0.05, 0.06, 0.07, 0.07], atol=1e-12
    )


def _cfg():
    return load_config(overrides=[
        "train.OFFICIAL_EPOCH_LENGTH=4", "optim.epochs=3", "optim.min_lr=1e-6", "optim.warmup_epochs=1",
        "optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "optim.freeze_last_layer_epochs=1",
        "teacher.momentum_teacher=0.992", "teacher.final_momentum_teacher=1.0", "teacher.warmup_teacher_temp=0.04",
        "teacher.teacher_temp=0.07", "teacher.warmup_teacher_temp_epochs=2",
    ])


def test_build_schedules_lengths_and_key_points():
    s = build_schedules(_cfg(), peak_lr=2e-3)
    assert len(s.lr) == 12
    assert s.lr[0] == 0.0 and s.lr[4] == pytest.approx(2e-3) and s.lr[-1] > 1e-6
    np.testing.assert_array_equal(s.last_layer_lr[:4], 0.0)  # frozen during the first epoch
    np.testing.assert_array_equal(s.last_layer_lr[4:], s.lr[4:])
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] == pytest.approx(0.4, abs=0.01)
    assert s.momentum[0] == pytest.approx(0.992) and 0.999 < s.momentum[-1] <= 1.0
    assert s.teacher_temp[0] == pytest.approx(0.04) and s.teacher_temp[7] == pytest.approx(0.07 - 0.03 / 8)
    assert s.teacher_temp[8] == pytest.approx(0.07)
    assert s.at(5) == {"lr": s.lr[5], "last_layer_lr": s.last_layer_lr[5], "weight_decay": s.weight_decay[5],
                       "momentum": s.momentum[5], "teacher_temp": s.teacher_temp[5]}


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        self.gamma = nn.Parameter(torch.ones(4))


class _Backbone(nn.Module):
    """Official parameter layout in miniature: tokens, patch_embed, blocks.N, norm."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.storage_tokens = nn.Parameter(torch.zeros(1, 2, 4))
        self.mask_token = nn.Parameter(torch.zeros(1, 4))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 4, 2)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.norm = nn.LayerNorm(4)


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(4, 4)
        self.last_layer = nn.Linear(4, 8, bias=False)


def _groups(shared_head=False):
    head = _Head()
    student = nn.ModuleDict({"backbone": _Backbone(), "dino_head": head, "ibot_head": head if shared_head else _Head()})
    return param_groups(student, n_blocks=2, layerwise_decay=0.9, patch_embed_lr_mult=0.2)


def _by_name(groups):
    return {n: g for g in groups for n in g["names"]}


def test_param_groups_lr_and_weight_decay_per_parameter():
    g = _by_name(_groups())
    expect = {  # name: (lr multiplier, wd multiplier, is last layer)
        "backbone.cls_token": (0.9**3, 0.0, False),
        "backbone.storage_tokens": (0.9**3, 0.0, False),
        "backbone.mask_token": (0.9**3, 0.0, False),
        "backbone.patch_embed.proj.weight": (0.9**3 * 0.2, 1.0, False),
        "backbone.patch_embed.proj.bias": (0.9**3 * 0.2, 0.0, False),
        "backbone.blocks.0.fc.weight": (0.9**2, 1.0, False),
        "backbone.blocks.0.fc.bias": (0.9**2, 0.0, False),
        "backbone.blocks.0.norm1.weight": (0.9**2, 0.0, False),
        "backbone.blocks.0.gamma": (0.9**2, 0.0, False),
        "backbone.blocks.1.fc.weight": (0.9, 1.0, False),
        "backbone.norm.weight": (1.0, 0.0, False),
        "dino_head.mlp.weight": (1.0, 1.0, False),
        "dino_head.mlp.bias": (1.0, 0.0, False),
        "dino_head.last_layer.weight": (1.0, 1.0, True),
        "ibot_head.last_layer.weight": (1.0, 1.0, True),
    }
    for name, (lr_mult, wd_mult, last) in expect.items():
        assert g[name]["lr_multiplier"] == pytest.approx(lr_mult), name
        assert (g[name]["wd_multiplier"], g[name]["is_last_layer"]) == (wd_mult, last), name
    assert len(g) == 3 + 2 + 2 * 5 + 2 + 2 * 3  # tokens, patch embed, blocks, norm, heads: each exactly once


def test_shared_head_parameters_appear_once():
    groups = _groups(shared_head=True)
    params = [p for grp in groups for p in grp["params"]]
    assert len(params) == len({id(p) for p in params})
    assert not any(n.startswith("ibot_head.") for grp in groups for n in grp["names"])


def test_apply_schedule_sets_lr_and_wd_per_group():
    opt = build_optimizer(_groups(), OptimConfig(adamw_beta1=0.9, adamw_beta2=0.999))
    apply_schedule(opt, lr=1e-3, last_layer_lr=0.0, weight_decay=0.05)
    for group in opt.param_groups:
        expected_lr = 0.0 if group["is_last_layer"] else 1e-3 * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == pytest.approx(0.05 * group["wd_multiplier"])
    assert opt.defaults["betas"] == (0.9, 0.999)


def test_frozen_last_layer_does_not_move():
    head = _Head()
    student = nn.ModuleDict({"backbone": _Backbone(), "dino_head": head, "ibot_head": _Head()})
    groups = param_groups(student, n_blocks=2, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    opt = build_optimizer(groups, OptimConfig())
    apply_schedule(opt, lr=1e-2, last_layer_lr=0.0, weight_decay=0.04)
    before_last, before_mlp = head.last_layer.weight.clone(), head.mlp.weight.clone()
    head.last_layer(head.mlp(torch.randn(3, 4))).square().sum().backward()
    opt.step()
    torch.testing.assert_close(head.last_layer.weight, before_last, rtol=0, atol=0)
    assert not torch.equal(head.mlp.weight, before_mlp)
