"""Multi-crop transform: shapes for any channel count, determinism, geometry on image + mask, channel views and the
in_chans rule, masked local crops, explicit per-group probabilities, normalisation, eval transform, tensor ops."""

import pytest
import torch
import torch.nn.functional as F

from dinocell.config import CROP_GROUPS, ConfigError, load_config
from dinocell.pipeline.augmentations import (
    adjust_intensity,
    box_downsample_2x,
    flip_rotate,
    gaussian_blur,
    resize,
    rgb_color_jitter,
    rgb_to_grayscale,
    sample_crop_box,
    solarize,
)
from dinocell.pipeline.loaders import build_eval_transform, build_ssl_transform
from dinocell.pipeline.transforms import _Field

NO_PHOTOMETRIC = ["crops.photometric_aug=false"]


def make_cfg(*overrides: str):
    small = ["crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=4"]
    return load_config(overrides=small + list(overrides))


def sample(channels: int = 5, height: int = 64, width: int = 80, seed: int = 0, **extra) -> dict:
    image = torch.rand(channels, height, width, generator=torch.Generator().manual_seed(seed))
    return {"image": image, "label": 2, "id": f"s{seed}", **extra}


@pytest.mark.parametrize("channels", [1, 3, 5, 6])
def test_crop_shapes_and_dtypes_for_any_channel_count(channels):
    out = build_ssl_transform(make_cfg(f"student.in_chans={channels}"))(sample(channels), 7)
    assert [tuple(c.shape) for c in out["global_crops"]] == [(channels, 32, 32)] * 2
    assert [tuple(c.shape) for c in out["local_crops"]] == [(channels, 16, 16)] * 4
    assert all(c.dtype == torch.float32 for c in out["global_crops"] + out["local_crops"])
    assert set(out) == {"global_crops", "local_crops"}


def test_crops_depend_only_on_seed_and_position():
    transform = build_ssl_transform(make_cfg())
    a, b, c = transform(sample(), 11), transform(sample(), 11), transform(sample(), 12)
    crops_a, crops_b = a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]
    assert all(torch.equal(x, y) for x, y in zip(crops_a, crops_b))
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])
    other_seed = build_ssl_transform(make_cfg("train.seed=1"))(sample(), 11)
    assert not torch.equal(a["global_crops"][0], other_seed["global_crops"][0])


@pytest.mark.parametrize("views", [("all", "all", "all"), ("mean", "single", "single")])
def test_the_input_image_is_never_modified(views):
    """Datasets hand one image to several crop sets (JUMP crops_per_field): the transform must only read it."""
    everything = ["crops.blur_probability={global1: 1.0, global2: 1.0, local: 1.0}",
                  "crops.solarization_probability={global1: 1.0, global2: 1.0, local: 1.0}",
                  "crops.noise_probability={global1: 1.0, global2: 1.0, local: 1.0}",
                  "crops.intensity_aug_probability=1.0", "crops.rotate90=true",
                  "crops.channel_mean=[0.5,0.5,0.5,0.5,0.5]", "crops.channel_std=[0.2,0.2,0.2,0.2,0.2]",
                  f"crops.channel_views={{global1: {views[0]}, global2: {views[1]}, local: {views[2]}}}",
                  f"student.in_chans={5 if views[0] == 'all' else 1}"]  # fmt: skip
    record = sample(height=200, width=200)  # large enough for the half-resolution path too
    before = record["image"].clone()
    build_ssl_transform(make_cfg(*everything))(record, 3)
    assert torch.equal(record["image"], before)


@pytest.mark.parametrize("hflip", [False, True])
@pytest.mark.parametrize("vflip", [False, True])
@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_flips_and_rotations_move_mask_and_image_together(hflip, vflip, turns):
    image = torch.rand(3, 12, 12)
    mask = image[:1] > 0.5
    moved_image, moved_mask = flip_rotate(image, hflip, vflip, turns), flip_rotate(mask, hflip, vflip, turns)
    assert torch.equal(moved_mask, moved_image[:1] > 0.5)
    identity = hflip == vflip and (turns + 2 * hflip) % 4 == 0  # both flips = a half turn
    assert torch.equal(moved_image, image) == identity


def test_rotation_turns_a_corner_pixel_counter_clockwise():
    x = torch.zeros(1, 3, 3)
    x[0, 0, 2] = 1.0  # top-right
    assert flip_rotate(x, False, False, 1)[0, 0, 0] == 1.0  # -> top-left
    assert flip_rotate(x, True, False, 0)[0, 0, 0] == 1.0  # hflip -> top-left
    assert flip_rotate(x, False, True, 0)[0, 2, 2] == 1.0  # vflip -> bottom-right


def test_mean_view_is_the_channel_average_and_single_view_is_one_input_channel():
    views = {
        v: make_cfg(*NO_PHOTOMETRIC, "crops.rotate90=true", *[f"crops.channel_views.{g}={v}" for g in CROP_GROUPS])
        for v in ("all", "mean", "single")
    }
    s = sample(5, 200, 180)  # big enough that some crops come from the half-resolution field
    for position in range(6):
        crops = {v: build_ssl_transform(cfg)(s, position) for v, cfg in views.items()}
        for i in range(2):
            every = crops["all"]["global_crops"][i]
            mean, single = crops["mean"]["global_crops"][i], crops["single"]["global_crops"][i]
            assert mean.shape == single.shape == (5, 32, 32)  # one channel replicated to student.in_chans=5
            assert torch.equal(mean[0].expand_as(mean), mean)
            torch.testing.assert_close(mean[0], every.mean(0), atol=1e-5, rtol=0)
            assert min(float((single[0] - every[c]).abs().max()) for c in range(5)) < 1e-6


def test_all_view_into_a_different_channel_count_is_an_error_except_one():
    with pytest.raises(ValueError, match=r"student.in_chans=3.*'mean' / 'single'"):
        build_ssl_transform(make_cfg("student.in_chans=3"))(sample(5), 0)
    into_one = build_ssl_transform(make_cfg("student.in_chans=1", *NO_PHOTOMETRIC))(sample(5), 0)
    mean_views = "crops.channel_views={global1: mean, global2: mean, local: mean}"
    as_mean = build_ssl_transform(make_cfg("student.in_chans=1", *NO_PHOTOMETRIC, mean_views))(sample(5), 0)
    assert torch.equal(into_one["global_crops"][0], as_mean["global_crops"][0])
    grey_into_three = build_ssl_transform(make_cfg("student.in_chans=3"))(sample(1), 0)
    g = grey_into_three["global_crops"][0]
    assert g.shape == (3, 32, 32) and torch.equal(g[0], g[2])


def test_unknown_view_and_groups_are_config_errors():
    with pytest.raises(ConfigError, match="crops.channel_views.global2='avg'"):
        make_cfg("crops.channel_views={global1: all, global2: avg, local: all}")
    with pytest.raises(ConfigError, match="unknown config key 'crops.blur_probability.global3'"):
        make_cfg("crops.blur_probability.global3=1.0")
    with pytest.raises(ConfigError, match="crops.noise_probability.local=1.5 .*a probability must lie in"):
        make_cfg("crops.noise_probability.local=1.5")
    with pytest.raises(ConfigError, match=r"crops.gamma_range=\[0.0, 1.0\]"):
        make_cfg("crops.gamma_range=[0.0,1.0]")


def test_masked_local_crop_share_zeroes_outside_the_mask():
    image = torch.rand(3, 96, 96) + 1.0  # strictly positive: zeros can only come from masking
    mask = torch.zeros(1, 96, 96, dtype=torch.bool)
    mask[:, :, :48] = True
    cfg = make_cfg("student.in_chans=3", "crops.local_crops_number=8", "crops.local_masked_crops_fraction=0.5")
    transform = build_ssl_transform(cfg)
    for position in range(10):
        out = transform({"image": image, "mask": mask, "label": -1, "id": "ct"}, position)
        zeros = [bool((c == 0).any()) for c in out["local_crops"]]
        assert zeros[4:] == [False] * 4  # plain crops keep every pixel
        assert not any((c == 0).any() for c in out["global_crops"])
        for crop in out["local_crops"][:4]:  # masked crops: a zero pixel is zero in every channel
            z = crop == 0
            assert torch.equal(z[0], z[1]) and torch.equal(z[0], z[2])
    masked_somewhere = sum(
        bool((c == 0).any())
        for p in range(10)
        for c in transform({"image": image, "mask": mask, "label": -1, "id": "ct"}, p)["local_crops"][:4]
    )
    assert masked_somewhere > 20  # half the field is outside: most masked crops show it


def test_masked_crops_without_a_mask_name_the_key():
    with pytest.raises(ValueError, match="local_masked_crops_fraction=0.5 needs a sample 'mask'.*'s0'"):
        build_ssl_transform(make_cfg("crops.local_masked_crops_fraction=0.5"))(sample(), 0)


def test_blur_probability_is_explicit_per_group_not_inverted():
    quiet = ["crops.intensity_aug_probability=0.0", "crops.solarization_probability={global1: 0, global2: 0, local: 0}"]
    blur_g1 = build_ssl_transform(make_cfg(*quiet, "crops.blur_probability={global1: 1.0, global2: 0.0, local: 0.0}"))
    no_blur = build_ssl_transform(make_cfg(*quiet, "crops.blur_probability={global1: 0.0, global2: 0.0, local: 0.0}"))
    for position in range(5):
        a, b = blur_g1(sample(), position), no_blur(sample(), position)
        assert not torch.allclose(a["global_crops"][0], b["global_crops"][0])  # global1 with p = 1 is always blurred
        assert torch.equal(a["global_crops"][1], b["global_crops"][1])
        assert all(torch.equal(x, y) for x, y in zip(a["local_crops"], b["local_crops"]))


def test_photometric_off_keeps_a_constant_field_constant_and_noise_changes_it():
    constant = {"image": torch.full((2, 50, 50), 0.25), "label": 0, "id": "c"}
    off = build_ssl_transform(make_cfg("student.in_chans=2", *NO_PHOTOMETRIC))(constant, 3)
    assert all(torch.allclose(c, torch.full_like(c, 0.25)) for c in off["global_crops"] + off["local_crops"])
    noisy_cfg = make_cfg("student.in_chans=2", "crops.intensity_aug_probability=0", "crops.noise_std=[0.1,0.1]",
                         "crops.noise_probability={global1: 1.0, global2: 1.0, local: 1.0}")
    noisy = build_ssl_transform(noisy_cfg)(constant, 3)
    assert all(0.05 < float(c.std()) < 0.15 for c in noisy["local_crops"])


def test_channel_mean_and_std_normalise_each_channel_and_views_use_their_stats():
    values = torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1)
    s = {"image": values.expand(3, 40, 40).clone(), "label": 0, "id": "n"}
    stats = ["crops.channel_mean=[1.0,1.0,2.0]", "crops.channel_std=[1.0,0.5,2.0]"]
    out = build_ssl_transform(make_cfg("student.in_chans=3", *NO_PHOTOMETRIC, *stats))(s, 0)
    expected = torch.tensor([0.0, 2.0, 1.0]).view(3, 1, 1)
    torch.testing.assert_close(out["global_crops"][0], expected.expand(3, 32, 32))
    mean_view = make_cfg("student.in_chans=3", *NO_PHOTOMETRIC, *stats,
                         "crops.channel_views={global1: mean, global2: mean, local: mean}")
    averaged = build_ssl_transform(mean_view)(s, 0)["global_crops"][0]
    torch.testing.assert_close(averaged, torch.full((3, 32, 32), (7 / 3 - 4 / 3) / (3.5 / 3)))
    with pytest.raises(ValueError, match="channel_mean has 3 values but sample 's0' has 5"):
        build_ssl_transform(make_cfg(*stats))(sample(5), 0)
    with pytest.raises(ValueError, match="must both be null"):
        build_ssl_transform(make_cfg("crops.channel_mean=[0.5]"))


def test_rgb_colour_aug_needs_three_channels():
    rgb = build_ssl_transform(make_cfg("student.in_chans=3", "crops.rgb_color_aug=true"))
    assert rgb(sample(3), 0)["global_crops"][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="rgb_color_aug=true needs 3-channel"):
        build_ssl_transform(make_cfg("crops.rgb_color_aug=true"))(sample(5), 0)


def test_rgb_colour_jitter_strengths_come_from_the_config(monkeypatch):
    """crops.rgb_color_jitter sets the ranges the factors are drawn from: 1 +- strength, hue shift +- hue."""
    from dinocell.pipeline import transforms

    drawn = []
    monkeypatch.setattr(transforms, "rgb_color_jitter", lambda crop, *factors: drawn.append(factors) or crop)
    for strengths in ([0.8, 0.8, 0.8, 0.2], [0.0, 0.0, 0.0, 0.0]):
        drawn.clear()
        cfg = make_cfg("student.in_chans=3", "crops.rgb_color_aug=true", f"crops.rgb_color_jitter={strengths}")
        transform = build_ssl_transform(cfg)
        for position in range(20):
            transform(sample(3), position)
        factors = torch.tensor(drawn)  # [n, 4]: brightness, contrast, saturation, hue shift
        assert len(drawn) > 50
        assert ((factors[:, :3] - 1).abs() <= torch.tensor(strengths[:3])).all()
        assert (factors[:, 3].abs() <= strengths[3]).all()
        if strengths[0] > 0:  # SimCLR's strengths reach beyond DINO's 0.4 / 0.4 / 0.2 / 0.1
            assert (factors[:, :3] - 1).abs().max() > 0.6 and factors[:, 3].abs().max() > 0.1


def test_eval_transform_is_deterministic_centre_crop_with_channel_rule():
    s = sample(5, 100, 150)
    out = build_eval_transform(make_cfg())(s)
    assert out["image"].shape == (5, 32, 32) and out["id"] == "s0" and out["label"] == 2
    assert torch.equal(out["image"], build_eval_transform(make_cfg())(s)["image"])
    full = resize(s["image"], (32, 48))
    torch.testing.assert_close(out["image"], full[:, :, 8:40])
    grey = build_eval_transform(make_cfg("student.in_chans=1"))(s)["image"]
    torch.testing.assert_close(grey[0], resize(s["image"].mean(0, keepdim=True), (32, 48))[0, :, 8:40])


def test_crop_boxes_respect_scale_and_bounds():
    import random

    rng = random.Random(0)
    for _ in range(500):
        top, left, h, w = sample_crop_box(120, 90, (0.05, 0.32), rng)
        assert top >= 0 and top + h <= 120 and left >= 0 and left + w <= 90
        assert 0.04 < h * w / (120 * 90) < 0.34 and 0.7 < w / h < 1.4


def test_half_resolution_field_matches_a_direct_resize_of_smooth_images():
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 400), torch.linspace(0, 2, 400), indexing="ij")
    image = torch.stack([torch.sin(yy) * torch.cos(xx), yy * 0.1 + xx * 0.2])
    field = _Field(image)
    region = field.region(10, 20, 300, 330, 32)
    assert region.shape == (2, 150, 165)  # taken from the half-resolution copy
    torch.testing.assert_close(resize(region, 32), resize(image[:, 10:310, 20:350], 32), atol=5e-3, rtol=0)
    assert field.region(0, 0, 60, 60, 32).shape == (2, 60, 60)  # mild downscale: full resolution
    halved = box_downsample_2x(torch.arange(16.0).view(1, 4, 4))
    torch.testing.assert_close(halved, torch.tensor([[[2.5, 4.5], [10.5, 12.5]]]))


def test_gaussian_blur_equals_a_2d_convolution_and_keeps_constants():
    x = torch.rand(2, 20, 24)
    sigma, r = 1.3, 4
    k1 = torch.exp(-0.5 * (torch.arange(-r, r + 1.0) / sigma) ** 2)
    k1 = k1 / k1.sum()
    kernel = (k1[:, None] * k1[None, :]).expand(2, 1, -1, -1)
    reference = F.conv2d(F.pad(x[None], (r, r, r, r), mode="reflect"), kernel, groups=2)[0]
    torch.testing.assert_close(gaussian_blur(x, sigma), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(gaussian_blur(torch.full((1, 10, 10), 0.3), 2.0), torch.full((1, 10, 10), 0.3))


def test_intensity_solarize_and_rgb_ops():
    x = torch.rand(2, 8, 8)
    ones = torch.ones(2)
    brightness = torch.tensor([2.0, 0.5])
    torch.testing.assert_close(adjust_intensity(x, brightness, ones, ones), x * brightness.view(2, 1, 1))
    torch.testing.assert_close(adjust_intensity(x, ones, ones, torch.tensor([2.0, 1.0]))[0], x[0] ** 2)
    flat = adjust_intensity(x, ones, torch.zeros(2), ones)
    torch.testing.assert_close(flat, x.mean(dim=(1, 2), keepdim=True).expand_as(x))
    torch.testing.assert_close(adjust_intensity(-x, ones, ones, torch.tensor([2.0, 2.0])), -(x**2))  # sign kept
    torch.testing.assert_close(solarize(torch.tensor([0.2, 0.5, 0.9]), 0.5), torch.tensor([0.2, 0.5, 0.1]))
    rgb = torch.rand(3, 6, 6)
    torch.testing.assert_close(rgb_color_jitter(rgb, 1.0, 1.0, 1.0, 0.0), rgb)
    torch.testing.assert_close(rgb_color_jitter(rgb, 1.0, 1.0, 1.0, 1.0), rgb, atol=1e-5, rtol=0)  # full hue turn
    assert not torch.allclose(rgb_color_jitter(rgb, 1.0, 1.0, 1.0, 0.25), rgb)
    grey = rgb_to_grayscale(rgb)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
