"""Meta-architecture: student/teacher layout, EMA update, and how the loss terms are combined (DINOv3 weights)."""

from pathlib import Path

import torch

from dinocell.config import load_config
from dinocell.loss import dino_loss, sinkhorn_knopp
from dinocell.pipeline.batch import SSLBatch
from dinocell.train.meta_arch import SSLMetaArch

TINY = [
    "student.arch=vit_test", "student.patch_size=8", "student.n_storage_tokens=1",
    "student.pos_embed_rope_rescale_coords=null", "crops.global_crops_size=16", "crops.local_crops_size=8",
    "crops.local_crops_number=2", "dino.head_n_prototypes=32", "ibot.head_n_prototypes=24",
    "dino.head_hidden_dim=16", "ibot.head_hidden_dim=16", "dino.head_bottleneck_dim=8", "ibot.head_bottleneck_dim=8",
    "student.in_chans=3", "student.layerscale=0.1",
]


def _cfg(*extra):
    return load_config(overrides=TINY + list(extra))


def _batch(cfg, b=3, masked=True):
    g, loc, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    gen = torch.Generator().manual_seed(0)
    n_patches = (g // cfg.student.patch_size) ** 2
    masks = torch.zeros(2 * b, n_patches, dtype=torch.bool)
    if masked:
        masks[0, :2] = True
        masks[4, 1:4] = True
    per_crop = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()
    return SSLBatch(
        global_crops=torch.randn(2 * b, 3, g, g, generator=gen),
        local_crops=torch.randn(n_local * b, 3, loc, loc, generator=gen),
        masks=masks,
        mask_indices=masks.flatten().nonzero().flatten(),
        mask_weights=(1.0 / per_crop).expand_as(masks)[masks],
        n_global_crops=2,
        n_local_crops=n_local,
    )


def test_state_dict_layout_and_teacher_is_frozen_copy():
    torch.manual_seed(0)
    model = SSLMetaArch(_cfg())
    keys = model.state_dict().keys()
    for prefix in ("student.backbone.", "student.dino_head.", "student.ibot_head.", "teacher.backbone.",
                   "teacher.dino_head.", "teacher.ibot_head."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert {"dino_center", "ibot_center"} <= set(keys)
    assert all(not p.requires_grad for p in model.teacher.parameters())
    for (ns, s), (nt, t) in zip(model.student.state_dict().items(), model.teacher.state_dict().items()):
        assert ns == nt and torch.equal(s, t)
    model.train()
    assert model.student.training and not model.teacher.training
    assert set(model.teacher_state_dict()) == {k[len("teacher."):] for k in keys if k.startswith("teacher.")}


def test_ema_update_exact():
    torch.manual_seed(0)
    model = SSLMetaArch(_cfg())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    s = [p.clone() for p in model.student.parameters()]
    t = [p.clone() for p in model.teacher.parameters()]
    # the step's logit statistics: cls logits sum to 20 over 10 rows (mean 2), no masked patch at all
    updates = {"dino_logit_sum": torch.full_like(model.dino_center, 20.0), "dino_logit_count": torch.tensor(10.0),
               "ibot_logit_sum": torch.zeros_like(model.ibot_center), "ibot_logit_count": torch.tensor(0.0)}
    model.after_step({"momentum": 0.9}, updates)
    for ps, pt, new in zip(s, t, model.teacher.parameters()):
        torch.testing.assert_close(new, 0.9 * pt + 0.1 * ps, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.dino_center, torch.full_like(model.dino_center, 0.2))  # 0.9 * 0 + 0.1 * 2
    assert (model.ibot_center == 0.0).all()  # no rows: the center stays
    model.after_step({"momentum": 1.0}, {})  # Sinkhorn-Knopp runs have no center statistics


def test_loss_combination_follows_dinov3_weights():
    cfg = _cfg("dino.loss_weight=0.7", "dino.koleo_loss_weight=0.3", "ibot.loss_weight=0.5")
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).train()
    batch = _batch(cfg)
    total, terms, updates = model(batch, teacher_temp=0.05)
    assert updates == {}  # Sinkhorn-Knopp has no running state
    # 2 global, 2 local crops: global pairs 2 (diagonal ignored), local pairs 4 -> scales 1/3 and 2/3
    expected = 0.7 * (terms["dino_global_crops_loss"] / 3 + 2 * terms["dino_local_crops_loss"] / 3)
    expected += 0.3 * 2 * terms["koleo_loss"] + 0.5 * terms["ibot_loss"]
    torch.testing.assert_close(total.detach(), expected)
    assert all(v.item() > 0 for v in terms.values())

    # the global DINO term recomputed independently: teacher on unmasked globals, student on masked globals
    with torch.no_grad():
        t_logits = model.teacher.dino_head(model.teacher.backbone.forward_features(batch.global_crops)[
            "x_norm_clstoken"])
        s_out = model.student.backbone.forward_features(batch.global_crops, masks=batch.masks)
        s_logits = model.student.dino_head(s_out["x_norm_clstoken"])
    ref = dino_loss(s_logits.unflatten(0, (2, -1)), sinkhorn_knopp(t_logits, 0.05).unflatten(0, (2, -1)),
                    ignore_diagonal=True)
    torch.testing.assert_close(terms["dino_global_crops_loss"], ref, rtol=1e-5, atol=1e-6)

    total.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.student.parameters() if p.grad is not None)


def test_without_local_crops_or_masks_the_terms_are_zero():
    cfg = _cfg("crops.local_crops_number=0", "dino.global_ignore_diagonal=false")
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    total, terms, _ = model(_batch(cfg, masked=False), teacher_temp=0.07)
    assert terms["dino_local_crops_loss"].item() == 0 and terms["ibot_loss"].item() == 0
    expected = cfg.dino.loss_weight * terms["dino_global_crops_loss"] + cfg.dino.koleo_loss_weight * 2 * terms[
        "koleo_loss"]
    torch.testing.assert_close(total.detach(), expected)


def test_shared_head_and_ema_centering():
    cfg = _cfg("ibot.separate_head=false", "ibot.head_n_prototypes=32", "train.centering=centering")
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    assert model.student.ibot_head is model.student.dino_head
    assert model.teacher.ibot_head is model.teacher.dino_head
    batch = _batch(cfg)
    _, _, updates = model(batch, teacher_temp=0.07)
    assert model.dino_center.abs().sum() == 0 and model.ibot_center.abs().sum() == 0  # forward changes no state
    # after the step the centers move by (1 - 0.9) * the batch mean of the teacher logits
    with torch.no_grad():
        out = model.teacher.backbone.forward_features(batch.global_crops)
        cls_mean = model.teacher.dino_head(out["x_norm_clstoken"]).mean(0, keepdim=True)
        patches = out["x_norm_patchtokens"].flatten(0, 1)[batch.mask_indices]
        patch_mean = model.teacher.ibot_head(patches).mean(0, keepdim=True)
    assert updates["dino_logit_count"] == 6 and updates["ibot_logit_count"] == len(batch.mask_indices)
    model.after_step({"momentum": 1.0}, updates)
    torch.testing.assert_close(model.dino_center, 0.1 * cls_mean)
    torch.testing.assert_close(model.ibot_center, 0.1 * patch_mean)


def test_pretrained_weights_initialise_student_and_teacher_backbones(tmp_path):
    from dinocell.train.checkpoint import save_eval_dump

    torch.manual_seed(1)
    source = SSLMetaArch(_cfg())
    with torch.no_grad():
        for p in source.teacher.parameters():
            p.add_(1.0)
    path = save_eval_dump(tmp_path / "eval" / "final", source.eval_dump())
    torch.manual_seed(2)
    model = SSLMetaArch(_cfg(f"student.pretrained_weights={path}"))
    for name, value in source.teacher.backbone.state_dict().items():
        assert torch.equal(model.student.backbone.state_dict()[name], value), name
        assert torch.equal(model.teacher.backbone.state_dict()[name], value), name
    # heads start fresh, not from the file
    assert not torch.equal(model.student.dino_head.last_layer.weight, source.teacher.dino_head.last_layer.weight)


def test_bench_flop_formula_matches_the_flop_counter_plus_attention():
    """scripts/bench_train.py's analytic count = torch's FlopCounterMode (linear, conv) + 4 n^2 D per block (SDPA)."""
    import importlib.util

    from torch.utils.flop_counter import FlopCounterMode

    script = Path(__file__).parents[1] / "scripts" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = _cfg()
    model = SSLMetaArch(cfg).eval()
    backbone = model.student.backbone
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone.forward_features(torch.randn(1, 3, 16, 16))
    n = 1 + 1 + 4  # cls + 1 storage token + (16 / 8)^2 patches
    attention = backbone.n_blocks * 4 * n * n * backbone.embed_dim
    assert bench.vit_forward_flops(cfg, backbone, 16) == counter.get_total_flops() + attention
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.student.dino_head(torch.randn(1, backbone.embed_dim))
    assert bench.head_flops(cfg.dino, backbone.embed_dim) == counter.get_total_flops()
