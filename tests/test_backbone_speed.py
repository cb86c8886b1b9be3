"""The backbone's speed paths, each against a plain reference: the concatenated list-forward (vs one crop batch at a
time and vs a hand-written ViT), RoPE token tables and their cache, drop path as a tensor, activation checkpointing,
and blocks compiled with torch.compile."""

import copy
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from dinocell.layers import DropPath, RopePositionEmbedding, TokenGroup, rotate
from dinocell.models import build_backbone

OUTPUT_KEYS = ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm")


def _crops() -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Three crop batches of different sizes and resolutions (global, local, a third size), masks on the first."""
    torch.manual_seed(0)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(4, 3, 16, 16), torch.randn(3, 3, 24, 16)]
    masks = [torch.rand(2, 16) < 0.5, None, None]
    return crops, masks


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(1)
    model = build_backbone("vit_test", patch_size=8, layerscale_init=1.0, **kwargs)  # blocks matter at init
    with torch.no_grad():  # non-trivial norms, tokens and k-masked biases, so every parameter shows in the output
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "token" in name:
                p.normal_(0.0, 0.5)
    return model


def _rotate_half_reference(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """RoPE as FACTS section 1 states it: rotate-half on the last sin.shape[0] tokens, prefix unchanged."""
    n_prefix = x.shape[-2] - sin.shape[0]
    patches = x[..., n_prefix:, :]
    first, second = patches.chunk(2, dim=-1)
    rotated = patches * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((x[..., :n_prefix, :], rotated), dim=-2)


def _reference_features(model, x: torch.Tensor, mask: torch.Tensor | None, local_crops: bool) -> dict:
    """Hand-written forward of one crop batch: explicit softmax attention, rotate-half RoPE, no drop path."""
    b, p = x.shape[0], model.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=p).flatten(2).mT
    if mask is not None:
        patches = torch.where(mask[..., None], model.mask_token, patches)
    t = torch.cat([model.cls_token.expand(b, -1, -1), model.storage_tokens.expand(b, -1, -1), patches], dim=1)
    n_tokens, dim, heads = t.shape[1], model.embed_dim, model.num_heads
    sin, cos = model.rope_embed(h, w)
    for blk in model.blocks:
        qkv = F.linear(blk.norm1(t), blk.attn.qkv.weight, blk.attn.qkv.bias * blk.attn.qkv.bias_mask)
        q, k, v = qkv.view(b, n_tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k = _rotate_half_reference(q, sin, cos), _rotate_half_reference(k, sin, cos)
        attn = (q @ k.mT / math.sqrt(dim // heads)).softmax(dim=-1) @ v
        t = t + blk.ls1.gamma * blk.attn.proj(attn.transpose(1, 2).reshape(b, n_tokens, dim))
        t = t + blk.ls2.gamma * blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(t))))
    n_prefix = 1 + model.n_storage_tokens
    prefix_norm = model.local_cls_norm if local_crops and model.local_cls_norm is not None else model.norm
    prefix = prefix_norm(t[:, :n_prefix])
    return {"x_norm_clstoken": prefix[:, 0], "x_storage_tokens": prefix[:, 1:],
            "x_norm_patchtokens": model.norm(t[:, n_prefix:]), "x_prenorm": t}


@pytest.mark.parametrize("local_cls_norm", [False, True], ids=["shared-norm", "local_cls_norm"])
def test_concatenated_list_forward_equals_per_group_forward(local_cls_norm: bool) -> None:
    model = _model(untie_global_and_local_cls_norm=local_cls_norm).train()  # train: local_cls_norm is active
    if local_cls_norm:
        with torch.no_grad():
            model.local_cls_norm.bias.normal_(0.0, 1.0)
    crops, masks = _crops()
    together = model.forward_features(crops, masks)
    for i, (crop, mask, out) in enumerate(zip(crops, masks, together)):
        reference = _reference_features(model, crop, mask, local_crops=i == 1)
        alone = model.forward_features(crop, mask)  # one batch: never the local_cls_norm
        for key in OUTPUT_KEYS:
            assert out[key].shape == reference[key].shape, key
            assert (out[key] - reference[key]).abs().max() <= 1e-5, (i, key)
            if key == "x_prenorm" or key == "x_norm_patchtokens" or not (local_cls_norm and i == 1):
                assert (out[key] - alone[key]).abs().max() <= 1e-5, (i, key)
        assert out["masks"] is mask
    if local_cls_norm:  # the second batch really went through its own norm
        assert not torch.allclose(together[1]["x_norm_clstoken"], model.forward_features(crops[1])["x_norm_clstoken"],
                                  atol=1e-2)


def test_concatenated_list_forward_has_the_per_group_gradients() -> None:
    crops, masks = _crops()
    model = _model().eval()
    other = copy.deepcopy(model)

    def loss(outs: list[dict]) -> torch.Tensor:
        return sum((o["x_norm_clstoken"] ** 2).sum() + o["x_norm_patchtokens"].sum() for o in outs)

    loss(model.forward_features(crops, masks)).backward()
    loss([other.forward_features(c, m) for c, m in zip(crops, masks)]).backward()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_rope_token_tables_rotate_like_rotate_half_in_fp32() -> None:
    rope = RopePositionEmbedding(embed_dim=64, num_heads=2)
    sin, cos = rope(3, 4)
    tables = rope.token_rotation(3, 4, n_prefix=5)
    assert tables[0].shape == tables[1].shape == (5 + 12, 32)
    assert torch.all(tables[0][:5] == 0) and torch.all(tables[1][:5] == 1)  # identity on cls + storage tokens
    x = torch.randn(2, 2, 5 + 12, 32)
    assert torch.allclose(rotate(x, *tables), _rotate_half_reference(x, sin, cos), atol=1e-6)
    assert torch.equal(rotate(x, *tables)[:, :, :5], x[:, :, :5])
    # bf16 in: the rotation runs in fp32 and is rounded once
    x16 = x.bfloat16()
    assert rotate(x16, *tables).dtype == torch.bfloat16
    assert torch.equal(rotate(x16, *tables), _rotate_half_reference(x16.float(), sin, cos).bfloat16())


def test_rope_tables_are_cached_unless_coordinates_are_augmented() -> None:
    rope = RopePositionEmbedding(embed_dim=64, num_heads=2, rescale_coords=2.0).eval()
    first = rope.token_rotation(4, 4, 5)
    assert rope.token_rotation(4, 4, 5) is first  # eval: computed once
    assert rope.token_rotation(2, 2, 5)[0].shape == (9, 32)  # another grid: its own tables
    rope.train()
    a, b = rope.token_rotation(4, 4, 5), rope.token_rotation(4, 4, 5)
    assert not torch.allclose(a[0], b[0])  # a fresh augmentation per call
    plain = RopePositionEmbedding(embed_dim=64, num_heads=2).train()
    assert plain.token_rotation(4, 4, 5) is plain.token_rotation(4, 4, 5)  # training without augmentation
    # stale tables are never served: in-place change, reload and device/dtype moves all invalidate
    rope.eval()
    before = rope.token_rotation(4, 4, 5)[0].clone()
    with torch.no_grad():
        rope.periods.mul_(2.0)
    assert not torch.allclose(rope.token_rotation(4, 4, 5)[0], before)
    rope.load_state_dict({"periods": RopePositionEmbedding(embed_dim=64, num_heads=2).periods})
    assert torch.equal(rope.token_rotation(4, 4, 5)[0], before)
    twin = copy.deepcopy(rope)
    with torch.no_grad():
        twin.periods.mul_(3.0)
    assert torch.equal(rope.token_rotation(4, 4, 5)[0], before)


def test_tables_made_in_inference_mode_serve_training() -> None:
    model = _model().eval()
    crops, _ = _crops()
    with torch.inference_mode():
        model.forward_features(crops[0])
    model.forward_features(crops[0])["x_norm_clstoken"].sum().backward()  # would fail on inference tensors
    assert model.blocks[0].attn.qkv.weight.grad is not None


def _aten_ops(fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


def test_a_block_makes_no_rope_concatenations_or_dtype_copies() -> None:
    model = _model()
    block = model.blocks[0].eval()
    tables = model.rope_embed.token_rotation(4, 4, 5)
    x = torch.randn(2 * 21, 32)
    one = (TokenGroup(2, 21, tables),)
    ops = _aten_ops(lambda: block(x, groups=one))
    assert ops.count("aten::cat") == 0 and ops.count("aten::_to_copy") == 0, sorted(set(ops))
    two = (TokenGroup(1, 21, tables), TokenGroup(1, 21, tables))
    assert _aten_ops(lambda: block(x, groups=two)).count("aten::cat") == 1  # joining the groups' attention outputs


def test_drop_path_draws_once_per_image_in_the_flat_layout() -> None:
    drop = DropPath(0.5).train()
    groups = (TokenGroup(3, 4, None), TokenGroup(2, 5, None))
    torch.manual_seed(0)
    kept = []
    for _ in range(200):
        out = drop(torch.ones(3 * 4 + 2 * 5, 8), groups)
        images = list(out[:12].view(3, 4 * 8)) + list(out[12:].view(2, 5 * 8))
        for image in images:  # all tokens of an image share one draw: all dropped or all kept (x 1 / keep prob)
            assert torch.all(image == 0) or torch.all(image == 2)
        kept.append([bool(image[0]) for image in images])
    share = torch.tensor(kept, dtype=torch.float32).mean(0)
    assert torch.all((share > 0.35) & (share < 0.65)), share
    assert len(drop.state_dict()) == 0  # the rate comes from the config, checkpoints stay in the official layout
    meta = build_backbone("vit_test", drop_path_rate=0.4, device="meta")
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert meta.blocks[1].drop_path.keep_prob.item() == pytest.approx(0.6)


def test_activation_checkpointing_gives_the_same_outputs_and_gradients() -> None:
    crops, masks = _crops()
    model = _model(drop_path_rate=0.3, pos_embed_rope_rescale_coords=2.0).train()  # random draws must replay
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing = True
    calls = []
    block, block_forward = checkpointed.blocks[1], checkpointed.blocks[1].forward
    block.forward = lambda *args, **kwargs: calls.append(1) or block_forward(*args, **kwargs)  # hooks skip recompute
    results = []
    for m in (model, checkpointed):
        torch.manual_seed(3)
        outs = m.forward_features(crops, masks)
        sum((o["x_norm_clstoken"] ** 2).sum() + o["x_norm_patchtokens"].sum() for o in outs).backward()
        results.append((outs, {n: p.grad for n, p in m.named_parameters()}))
    (outs, grads), (outs_ckpt, grads_ckpt) = results
    assert len(calls) == 2  # the block ran again in backward: activations were not kept
    for a, b in zip(outs, outs_ckpt):
        for key in OUTPUT_KEYS:
            assert torch.allclose(a[key], b[key], atol=1e-6), key
    for name, grad in grads.items():
        assert grad is not None and torch.allclose(grad, grads_ckpt[name], atol=1e-6), name
    with torch.no_grad():  # no gradient, nothing to save: plain forward
        calls.clear()
        checkpointed.forward_features(crops[0])
        assert len(calls) == 1


def test_compiled_blocks_share_one_graph_per_mode_without_graph_breaks() -> None:
    """FACTS section 6: a guard on each block's drop-path float recompiled per block until dynamo's limit."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = _model(depth=6, drop_path_rate=0.3)  # 6 different drop rates 0 .. 0.3
    reference = copy.deepcopy(model).eval()
    model.compile_blocks(backend=counting_backend)  # fullgraph: a graph break would raise
    crops, masks = _crops()
    for _ in range(2):
        model.train()
        sum(o["x_norm_clstoken"].sum() for o in model.forward_features(crops, masks)).backward()
        model.eval()
        with torch.no_grad():
            compiled = model.forward_features(crops, masks)
    # block 0 (rate 0) has no DropPath, the 5 others share one graph; one more pair for eval without grad
    assert len(graphs) == 4
    with torch.no_grad():
        for a, b in zip(compiled, reference.forward_features(crops, masks)):
            assert torch.allclose(a["x_norm_patchtokens"], b["x_norm_patchtokens"], atol=1e-6)
    assert list(model.state_dict()) == list(reference.state_dict())  # compiling renames nothing
    torch._dynamo.reset()


def test_compiled_blocks_match_eager_forward_and_backward() -> None:
    """Traced through AOTAutograd (forward and backward graphs), run without code generation: fast on any CPU."""
    torch._dynamo.reset()
    crops, masks = _crops()
    model = _model().eval()
    compiled = copy.deepcopy(model)
    compiled.compile_blocks(backend="aot_eager")
    results = []
    for m in (model, compiled):
        outs = m.forward_features(crops, masks)
        sum((o["x_norm_clstoken"] ** 2).sum() + o["x_norm_patchtokens"].sum() for o in outs).backward()
        results.append((outs, [p.grad for p in m.parameters()]))
    for a, b in zip(results[0][0], results[1][0]):
        for key in OUTPUT_KEYS:
            assert torch.allclose(a[key], b[key], atol=1e-5), key
    for g, h in zip(results[0][1], results[1][1]):
        assert torch.allclose(g, h, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_blocks_match_eager() -> None:
    """Real code generation (inductor, C++ on CPU): ~40 s of one-time compiler start-up on 2 cores."""
    if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler on PATH: install g++ (apt-get install g++) to test torch.compile's inductor")
    torch._dynamo.reset()
    crops, _ = _crops()
    model = _model(depth=1).eval()
    compiled = copy.deepcopy(model)
    compiled.compile_blocks()
    with torch.no_grad():
        for a, b in zip(model.forward_features(crops), compiled.forward_features(crops)):
            for key in OUTPUT_KEYS:
                assert torch.allclose(a[key], b[key], atol=1e-5), key
    torch._dynamo.reset()
