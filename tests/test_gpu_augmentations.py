"""Batched (device) photometric augmentations against the CPU reference transform, crop by crop: the same draws from
the same seeded stream, the same pixels (noise: the same distribution), every switch visibly on or off."""

import random

import pytest
import torch

from dinocell.config import CROP_GROUPS, load_config
from dinocell.pipeline.gpu_augmentations import PhotometricBatch, apply_photometric, draw_photometric
from dinocell.pipeline.samplers import SeedStream, derive_seed
from dinocell.pipeline.transforms import MultiCropTransform

EVERY_OP_SOMETIMES = [  # each op fires for some crops and not for others
    "crops.intensity_aug_probability=0.5",
    "crops.blur_probability={global1: 0.5, global2: 0.5, local: 0.5}",
    "crops.solarization_probability={global1: 0.5, global2: 0.5, local: 0.5}",
]


def _settings(*overrides: str):
    return load_config(overrides=list(overrides)).crops


def _rng(position: int) -> random.Random:
    return random.Random(derive_seed(0, SeedStream.CROPS, position))


def _both_paths(settings, group: str, crops: torch.Tensor, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor,
                                                                                          list]:
    """(reference crops, batched crops, drawn parameters) for crops [B, C, H, W], crop i seeded by position i."""
    reference = MultiCropTransform(settings, in_chans=crops.shape[1], seed=0)
    expected, params = [], []
    for i, crop in enumerate(crops):
        ref_rng, rng = _rng(i), _rng(i)
        expected.append(reference._photometric(crop.clone(), group, ref_rng))
        params.append(draw_photometric(settings, group, crops.shape[1], rng))
        assert rng.getstate() == ref_rng.getstate(), "the draws left the reference stream"
    batch = PhotometricBatch.stack(params, device)
    out = apply_photometric(crops.to(device), batch, settings.solarization_threshold).cpu()
    return torch.stack(expected), out, params


@pytest.mark.parametrize("group", CROP_GROUPS)
@pytest.mark.parametrize(("channels", "rgb"), [(5, False), (1, False), (3, True)], ids=["5ch", "1ch", "rgb"])
def test_batched_ops_equal_the_reference_crop_by_crop(group: str, channels: int, rgb: bool) -> None:
    settings = _settings(*EVERY_OP_SOMETIMES, f"crops.rgb_color_aug={str(rgb).lower()}", "crops.blur_sigma=[0.1, 9]")
    crops = torch.rand(24, channels, 16, 16, generator=torch.Generator().manual_seed(1))
    expected, out, params = _both_paths(settings, group, crops)
    assert (out - expected).abs().max() <= 1e-5
    for op in ("intensity", "blur", "solarize"):  # the test sees every op both ways
        assert 0 < sum(getattr(p, op) for p in params) < len(params), op
    assert any(p.blur and 3 * p.sigma > 15 for p in params)  # kernel clamped to the 16 px crop, as the reference
    if rgb:
        assert 0 < sum(p.color.jitter for p in params) < 24 and 0 < sum(p.color.grayscale for p in params) < 24


def test_each_switch_off_never_changes_a_crop_and_on_always_does() -> None:
    crops = torch.rand(16, 2, 16, 16, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05
    nothing = _settings("crops.intensity_aug_probability=0", "crops.blur_probability.local=0",
                        "crops.solarization_probability.local=0", "crops.noise_probability.local=0")
    assert torch.equal(_both_paths(nothing, "local", crops)[1], crops)
    cases = {
        "intensity": "crops.intensity_aug_probability=1",
        "blur": "crops.blur_probability.local=1",  # with sigma >= 1 (0.1 is a no-op blur in both paths)
        "solarize": "crops.solarization_probability.local=1",
        "noise": "crops.noise_probability.local=1",
    }
    for op, switch in cases.items():
        off = [o for o in ("crops.intensity_aug_probability=0", "crops.blur_probability.local=0",
                           "crops.solarization_probability.local=0", "crops.noise_probability.local=0")
               if not o.startswith(switch.split("=")[0])]
        out = _both_paths(_settings(switch, *off, "crops.noise_std=[0.02, 0.05]", "crops.blur_sigma=[1, 2]"), "local",
                         crops)[1]
        changed = (out - crops).flatten(1).abs().amax(1) > 1e-4
        assert torch.all(changed), op


def test_noise_matches_the_reference_in_distribution_and_is_reproducible() -> None:
    settings = _settings("crops.intensity_aug_probability=0", "crops.blur_probability.local=0",
                         "crops.noise_probability.local=0.5", "crops.noise_std=[0.01, 0.1]")
    crops = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    expected, out, params = _both_paths(settings, "local", crops)
    noisy = torch.tensor([p.noise for p in params])
    assert 0 < noisy.sum() < 32
    assert torch.equal(out[~noisy], crops[~noisy]) and torch.equal(expected[~noisy], crops[~noisy])
    for got, ref, crop, p in zip(out[noisy], expected[noisy], crops[noisy], [p for p in params if p.noise]):
        for residual in (got - crop, ref - crop):  # 3072 values: the std within 5 %, the mean near 0
            assert residual.std().item() == pytest.approx(p.noise_std, rel=0.05)
            assert abs(residual.mean().item()) < 4 * p.noise_std / 3072**0.5
        assert not torch.allclose(got, ref)  # another generator: not the same values
    again = apply_photometric(crops, PhotometricBatch.stack(params), settings.solarization_threshold)
    assert torch.equal(again, out)


def test_rgb_colour_aug_needs_three_channels() -> None:
    settings = _settings("crops.rgb_color_aug=true")
    with pytest.raises(ValueError, match="rgb_color_aug=true needs 3-channel RGB crops but crop group local has 5"):
        draw_photometric(settings, "local", 5, _rng(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU machine (scripts/gpu_check.sh)")
def test_cuda_equals_the_cpu_reference() -> None:
    settings = _settings(*EVERY_OP_SOMETIMES)
    crops = torch.rand(24, 5, 32, 32, generator=torch.Generator().manual_seed(4))
    expected, out, _ = _both_paths(settings, "local", crops, device="cuda")
    assert (out - expected).abs().max() <= 1e-5
