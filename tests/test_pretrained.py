"""load_pretrained: every source layout, lossless strict loading, channel and patch-size adaptation, bad inputs."""

import dataclasses
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dinocell.models import WeightsError, build_backbone, load_pretrained
from dinocell.models.pretrained import pi_resize_patch_kernel


def _tiny(**kwargs) -> torch.nn.Module:
    return build_backbone("vit_test", layerscale_init=1.0, **kwargs).eval()


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def vit_small_16() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vit_small", layerscale_init=1.0).eval()  # blocks matter at init, unlike with 1e-5


def test_official_layout_round_trip_is_strict_and_lossless(tmp_path, vit_small_16) -> None:
    path = tmp_path / "dinov3_vits16.pth"
    torch.save(vit_small_16.state_dict(), path)
    torch.manual_seed(1)
    fresh = build_backbone("vit_small")
    report = load_pretrained(fresh, path)
    assert report.layout == "official DINOv3"
    assert (report.adapted, report.missing, report.unexpected) == ([], [], [])
    _assert_same_weights(fresh, vit_small_16)


def test_safetensors_file(tmp_path) -> None:
    src = _tiny()
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    dst = _tiny()
    load_pretrained(dst, tmp_path / "w.safetensors")
    _assert_same_weights(dst, src)


def test_eval_dump_and_training_checkpoints_prefer_the_teacher(tmp_path) -> None:
    teacher, student = _tiny(), _tiny()
    head = {"dino_head.mlp.0.weight": torch.zeros(4, 32), "ibot_head.last_layer.weight": torch.zeros(8, 4)}
    eval_dump = {"teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head}}
    torch.save(eval_dump, tmp_path / "teacher_checkpoint.pth")
    model = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    model |= {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
    model |= {f"student.{k}": v for k, v in head.items()}
    ckpt_dir = tmp_path / "ckpt" / "100"
    ckpt_dir.mkdir(parents=True)
    torch.save({"model": model, "iteration": 100}, ckpt_dir / "checkpoint.pth")

    for source, layout in [
        (tmp_path / "teacher_checkpoint.pth", "eval dump (teacher.backbone)"),
        (tmp_path, "eval dump (teacher.backbone)"),  # a directory holding teacher_checkpoint.pth
        (ckpt_dir, "training checkpoint (teacher.backbone)"),
        (ckpt_dir / "checkpoint.pth", "training checkpoint (teacher.backbone)"),
    ]:
        dst = _tiny()
        report = load_pretrained(dst, source)
        assert report.layout == layout
        _assert_same_weights(dst, teacher)

    student_only = {"model": {k: v for k, v in model.items() if k.startswith("student.")}}
    dst = _tiny()
    assert load_pretrained(dst, student_only).layout == "training checkpoint (student.backbone)"
    _assert_same_weights(dst, student)


@pytest.mark.parametrize("in_chans", [1, 5, 6])
def test_channel_inflation_reproduces_the_rgb_model_on_grey_input(in_chans: int) -> None:
    torch.manual_seed(0)
    rgb = _tiny(patch_size=8)
    multi = _tiny(patch_size=8, in_chans=in_chans)
    report = load_pretrained(multi, rgb.state_dict())
    assert report.adapted == [f"patch_embed.proj.weight: 3 -> {in_chans} channels (mean kernel x 3/{in_chans})"]
    g = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = rgb.forward_features(g.expand(-1, 3, -1, -1))
        out = multi.forward_features(g.expand(-1, in_chans, -1, -1))
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        assert torch.allclose(out[key], ref[key], atol=1e-5, rtol=0), key


def test_pi_resize_is_exact_for_block_constant_patches_and_upsampling() -> None:
    torch.manual_seed(0)
    w16 = torch.randn(4, 2, 16, 16)
    w8 = pi_resize_patch_kernel(w16, 8)
    x8 = torch.randn(3, 2, 8, 8)
    x16 = x8.repeat_interleave(2, -1).repeat_interleave(2, -2)  # 16 px patch made of 2x2 blocks
    assert torch.allclose(F.conv2d(x8, w8), F.conv2d(x16, w16), atol=1e-4, rtol=1e-5)
    # up (8 -> 16) the resize is injective, so the token embedding is preserved for every patch
    w_up = pi_resize_patch_kernel(w8, 16)
    x_up = F.interpolate(x8, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(F.conv2d(x_up, w_up), F.conv2d(x8, w8), atol=1e-4, rtol=1e-5)


def test_patch_16_checkpoint_in_a_patch_8_vit_small(vit_small_16) -> None:
    """Tolerance achieved with random-init ViT-S weights (LayerScale 1) on a smooth image (bicubic upsample of 7x7
    noise) at 224 px vs the same image resized to 112 px: patch-embedding relative error 3.5% (a naive bilinear
    kernel resize gives 9%), patch-token relative error 4.7% (cosine >= 0.994), cls cosine >= 0.9997
    (max abs diff 0.08 on values of order 1). Trained kernels are smoother than random ones and do better."""
    vit_small_8 = build_backbone("vit_small", patch_size=8, layerscale_init=1.0).eval()
    report = load_pretrained(vit_small_8, vit_small_16.state_dict())
    assert report.adapted == ["patch_embed.proj.weight: patch 16x16 -> 8 (pseudo-inverse resize)"]
    torch.manual_seed(0)
    image = F.interpolate(torch.randn(2, 3, 7, 7), size=(224, 224), mode="bicubic", align_corners=False)
    resized = F.interpolate(image, size=(112, 112), mode="bilinear", align_corners=False)
    with torch.no_grad():
        ref = vit_small_16.forward_features(image)
        out = vit_small_8.forward_features(resized)
        embed_16, embed_8 = vit_small_16.patch_embed(image), vit_small_8.patch_embed(resized)
        n_tokens = vit_small_8.forward_features(image[:1])["x_norm_patchtokens"].shape[1]
    assert n_tokens == 784  # patch 8 at 224 px
    assert ((embed_8 - embed_16).norm() / embed_16.norm()).item() < 0.04
    patches, ref_patches = out["x_norm_patchtokens"], ref["x_norm_patchtokens"]
    assert ((patches - ref_patches).norm() / ref_patches.norm()).item() < 0.06
    assert F.cosine_similarity(patches, ref_patches, dim=-1).min() > 0.99
    assert F.cosine_similarity(out["x_norm_clstoken"], ref["x_norm_clstoken"], dim=-1).min() > 0.999
    assert (out["x_norm_clstoken"] - ref["x_norm_clstoken"]).abs().max() < 0.1


def test_non_strict_loading_reports_missing_and_unexpected() -> None:
    src = _tiny().state_dict()
    del src["norm.weight"]
    src["extra.thing"] = torch.zeros(1)
    dst = _tiny()
    with pytest.raises(ValueError) as info:
        load_pretrained(dst, src)
    assert str(info.value) == (
        "<state dict> (official DINOv3 layout) does not match the backbone key for key: missing ['norm.weight'], "
        "unexpected ['extra.thing']; expected a complete backbone of this architecture (a file edited or saved from "
        "a modified model loads only through load_pretrained(..., strict=False))"
    )
    report = load_pretrained(dst, src, strict=False)
    assert (report.missing, report.unexpected) == (["norm.weight"], ["extra.thing"])
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src["blocks.0.attn.qkv.weight"])  # random: really loaded
    assert "missing ['norm.weight']" in str(report)
    no_gamma = _tiny().state_dict()
    del no_gamma["blocks.1.ls2.gamma"]  # a block key missing is an incomplete file, not another architecture
    with pytest.raises(WeightsError, match=r"missing \['blocks.1.ls2.gamma'\], .*expected a complete backbone"):
        load_pretrained(dst, no_gamma)
    assert load_pretrained(dst, no_gamma, strict=False).missing == ["blocks.1.ls2.gamma"]


def test_every_container_must_hold_tensors(tmp_path):
    """Eval dumps, training checkpoints and directories get the same checks as a plain state dict file."""
    with pytest.raises(ValueError, match=r"not tensors: \['cls_token'\]"):
        load_pretrained(_tiny(), {"teacher": {"backbone.cls_token": 3}})
    run = tmp_path / "ckpt" / "10"
    run.mkdir(parents=True)
    torch.save([1, 2], run / "checkpoint.pth")
    with pytest.raises(ValueError, match=r"checkpoint\.pth holds a list, expected a dict of tensors"):
        load_pretrained(_tiny(), run)


@dataclasses.dataclass
class NotWeights:
    value: int = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_sources_raise_clear_errors(tmp_path) -> None:
    model = _tiny()
    good = tmp_path / "good.pth"
    torch.save(model.state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    expected = "; expected a PyTorch state dict saved with torch.save or a .safetensors file: it may be truncated, " \
               "corrupt, or another kind of file"
    with pytest.raises(ValueError) as info:
        load_pretrained(model, truncated)
    assert str(info.value) == f"{truncated} is not a readable checkpoint (PytorchStreamReader failed reading zip " \
                              f"archive: failed finding central directory){expected}"
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.txt is not a readable checkpoint \(its bytes are not a PyTorch"):
        load_pretrained(model, text)
    pickled = tmp_path / "object.pth"
    torch.save({"obj": NotWeights()}, pickled)  # weights_only refuses to unpickle arbitrary classes
    with pytest.raises(ValueError) as info:
        load_pretrained(model, pickled)
    assert str(info.value) == (f"{pickled} is not a readable checkpoint (it stores a Python object "
                               f"(test_pretrained.NotWeights), and weights are read as plain tensors only){expected}")
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(ValueError, match=r"empty\.pth is not a readable checkpoint \(the file is empty or ends early"):
        load_pretrained(model, empty)
    bad_safetensors = tmp_path / "w.safetensors"
    bad_safetensors.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match=r"w\.safetensors is not a readable checkpoint"):
        load_pretrained(model, bad_safetensors)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth is neither a file nor a directory"):
        load_pretrained(model, tmp_path / "missing.pth")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_dir holds none of the expected weight files"):
        load_pretrained(model, empty)
    url = f"http://127.0.0.1:{_free_port()}/dinov3_vits16.pth"
    with pytest.raises(WeightsError, match=rf"could not download {url} .* pass the local file path"):
        load_pretrained(model, url)
    with pytest.raises(ValueError, match=r"not tensors: \['step'\]"):
        load_pretrained(model, {"cls_token": torch.zeros(1, 1, 32), "step": 3})


def test_random_bytes_give_one_sentence_without_torch_advice(tmp_path) -> None:
    """torch's own message suggests weights_only=False and 'Please file an issue': neither applies to a bad file."""
    path = tmp_path / "random.pth"
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    with pytest.raises(WeightsError) as info:
        load_pretrained(_tiny(), path)
    message = str(info.value)
    assert message.startswith(f"{path} is not a readable checkpoint (")
    assert "\n" not in message and "file an issue" not in message and "weights_only" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_file_of_another_model_says_what_was_expected_and_what_it_holds(tmp_path) -> None:
    """Unrelated keys (here a small CNN classifier) are not an 'official DINOv3' file with every key missing."""
    other = {"features.0.weight": torch.zeros(8, 3, 3, 3), "features.0.bias": torch.zeros(8),
             "classifier.weight": torch.zeros(10, 8), "classifier.bias": torch.zeros(10), "head.weight": torch.zeros(2)}
    path = tmp_path / "cnn.pth"
    torch.save(other, path)
    with pytest.raises(WeightsError) as info:
        load_pretrained(_tiny(), path)
    assert str(info.value) == (
        f"{path} holds no backbone weights: none of its 5 entries ('features.0.weight', 'features.0.bias', "
        "'classifier.weight', 'classifier.bias', ...) is a backbone key such as 'cls_token', "
        "'blocks.0.attn.qkv.weight' or 'conv1.weight'. Expected an official DINOv3 backbone file, a Hugging Face "
        "DINOv3 model, a torchvision ResNet file, or a dinocell checkpoint (ckpt/<iteration>/ or "
        "eval/<iteration>/teacher_checkpoint.pth): point student.pretrained_weights (--checkpoint for dinocell knn) "
        "at one of these"
    )
    with pytest.raises(ValueError, match=r"none of its 1 entries \('state_dict'\)"):  # a state dict one level down
        load_pretrained(_tiny(), {"state_dict": _tiny().state_dict()})


def test_architecture_mismatches_name_the_setting_to_change() -> None:
    """Messages name the config key and the `dinocell knn` flag with the value that fits, not Python arguments."""
    vit_base = build_backbone("vit_base", device="meta").state_dict()
    with pytest.raises(WeightsError) as info:
        load_pretrained(build_backbone("vit_small", device="meta"), vit_base)
    assert str(info.value) == (
        "<state dict> holds a ViT of another architecture than the backbone (embed dim 768 in the checkpoint, 384 in "
        "the backbone); set student.arch=vit_base (`--arch vit_base` for dinocell knn)"
    )
    vit_small_plus = build_backbone("vit_small_plus", device="meta").state_dict()  # same width, SwiGLU blocks
    with pytest.raises(WeightsError, match=r"missing \['blocks.0.mlp.fc1.bias', .*unexpected \['blocks.0.mlp.w1.bias', "
                       r".*; set student.arch=vit_small_plus \(`--arch vit_small_plus` for dinocell knn\)$"):
        load_pretrained(build_backbone("vit_small", device="meta"), vit_small_plus)
    vit_large = build_backbone("vit_large", n_storage_tokens=0, device="meta").state_dict()
    with pytest.raises(ValueError, match=r"\(embed dim 1024 in the checkpoint, 384 .*student.arch=vit_large"):
        load_pretrained(build_backbone("vit_small", n_storage_tokens=0, device="meta"), vit_large)
    with pytest.raises(ValueError) as info:
        load_pretrained(_tiny(n_storage_tokens=0), _tiny().state_dict())
    assert str(info.value) == ("<state dict> has 4 storage tokens but the backbone has 0; set "
                               "student.n_storage_tokens=4 (`--n-storage-tokens 4` for dinocell knn)")
    with pytest.raises(ValueError, match=r"\(3 blocks in the checkpoint, 2 in the backbone\); no built-in arch"):
        load_pretrained(_tiny(), _tiny(depth=3).state_dict())
    with pytest.raises(ValueError, match=r"mlp.fc1.weight: checkpoint \[64, 32\] vs backbone \[128, 32\]\); no built"):
        load_pretrained(_tiny(), _tiny(ffn_ratio=2.0).state_dict())
    base_like = build_backbone("vit_test", embed_dim=64, device="meta").state_dict()
    with pytest.raises(ValueError, match=r"embed dim 64 in the checkpoint, 32 in the backbone\); no built-in arch has"):
        load_pretrained(_tiny(), base_like)


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts reads through Linux's /proc/self/io")
def test_the_pre_flight_check_does_not_read_the_weights_it_checks(tmp_path, vit_small_16) -> None:
    """The check loads into a meta-device backbone: only the file's index is read, so a multi-GB file is not read
    twice at start-up (the check, then the real load) and the ranks of a node share one page-cache copy."""
    from dinocell.config import load_config
    from dinocell.train.preflight import check_pretrained

    path = tmp_path / "vits16.pth"
    torch.save(vit_small_16.state_dict(), path)  # 86 MB
    size = path.stat().st_size
    student = load_config(overrides=["student.arch=vit_small", f"student.pretrained_weights={path}"]).student
    before = _bytes_read()
    check_pretrained(student)
    assert _bytes_read() - before < size / 20
    loaded = build_backbone("vit_small", layerscale_init=1.0)
    load_pretrained(loaded, path)  # the real load still gives every value
    _assert_same_weights(loaded, vit_small_16)
