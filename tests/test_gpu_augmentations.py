"""Batched (device) photometric augmentations against the CPU reference transform, crop by crop: the same draws from
the same seeded stream, the same pixels (noise: the same distribution), every switch visibly on or off; and
crops.gpu_augmentations through the whole pipeline (loader, collate, SSLBatch.finish_crops) against the CPU path."""

import itertools
import random

import pytest
import torch

from dinocell.config import CROP_GROUPS, load_config
from dinocell.data.dataset import SampleDataset
from dinocell.pipeline import photometric, transforms
from dinocell.pipeline.gpu_augmentations import PhotometricBatch, apply_photometric
from dinocell.pipeline.loaders import build_ssl_loader_from_config
from dinocell.pipeline.photometric import draw_photometric
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


class _Fields(SampleDataset):
    """Random fields in [0, 1] with a sample mask (the left 60 % of the field) for masked local crops."""

    def __init__(self, channels: int, n: int = 8, size: int = 48) -> None:
        g = torch.Generator().manual_seed(channels)
        self.images = torch.rand(n, channels, size, size, generator=g)
        self.mask = torch.zeros(1, size, size, dtype=torch.bool)
        self.mask[..., : int(0.6 * size)] = True

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": 0, "id": str(index), "mask": self.mask}


PIPELINES = {  # (dataset channels, model channels, overrides): every op, channel view, mask and normalisation
    "5ch views, normalised": (5, 5, [
        "crops.channel_views={global1: all, global2: mean, local: single}",
        "crops.channel_mean=[0.1,0.2,0.3,0.4,0.5]", "crops.channel_std=[0.5,1.0,1.5,2.0,2.5]",
        "crops.solarization_probability={global1: 0.5, global2: 0.5, local: 0.5}"]),
    "1 channel views into 5": (5, 5, ["crops.channel_views={global1: mean, global2: single, local: single}",
                                      "crops.blur_probability={global1: 0.5, global2: 0.5, local: 0.5}"]),
    "masked local crops": (2, 2, ["crops.local_masked_crops_fraction=0.5", "crops.channel_mean=[0.5,0.5]",
                                  "crops.channel_std=[0.2,0.3]"]),
    "rgb colour": (3, 3, ["crops.rgb_color_aug=true", "crops.rgb_color_jitter=[0.8,0.8,0.8,0.2]"]),
    "noise, mixed views": (5, 5, ["crops.channel_views={global1: all, global2: mean, local: all}",
                                  "crops.noise_probability={global1: 0.5, global2: 0.5, local: 0.5}",
                                  "crops.noise_std=[0.05,0.1]"]),
    "photometric off": (5, 1, ["crops.photometric_aug=false", "crops.channel_mean=[0.1,0.2,0.3,0.4,0.5]",
                               "crops.channel_std=[1,2,3,4,5]"]),
}  # fmt: skip


def _loader_batches(channels: int, in_chans: int, overrides: list[str], device_path: bool) -> list:
    cfg = load_config(overrides=[
        "student.arch=vit_test", "student.patch_size=8", f"student.in_chans={in_chans}", "crops.global_crops_size=32",
        "crops.local_crops_size=16", "crops.local_crops_number=4", "train.batch_size_per_gpu=4", "train.num_workers=0",
        "crops.rotate90=true", "crops.intensity_aug_probability=0.5", *overrides,
        f"crops.gpu_augmentations={str(device_path).lower()}",
    ])  # fmt: skip
    loader = build_ssl_loader_from_config(cfg, _Fields(channels), rank=0, world_size=1, start_iter=0)
    return list(itertools.islice(iter(loader), 2))


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_device_path_gives_the_cpu_crops_through_the_whole_pipeline(pipeline: str) -> None:
    """Loader -> collate -> SSLBatch.finish_crops (on the CPU here; the step runs it on its device) against the CPU
    path, crop by crop: the same crops to float rounding, except that noisy crops differ by noise of the drawn std."""
    channels, in_chans, overrides = PIPELINES[pipeline]
    for cpu, device in zip(*(_loader_batches(channels, in_chans, overrides, path) for path in (False, True))):
        assert cpu.device_augmentation is None and device.device_augmentation is not None
        finished = device.finish_crops()
        assert finished.device_augmentation is None
        assert torch.equal(finished.masks, cpu.masks) and torch.equal(finished.mask_indices, cpu.mask_indices)
        for key in ("global_crops", "local_crops"):
            pending = getattr(device.device_augmentation, key)
            got, ref = getattr(finished, key), getattr(cpu, key)
            assert got.shape == ref.shape and got.dtype == ref.dtype
            noisy = torch.zeros(len(got), dtype=torch.bool)
            if pending.photometric is not None:
                noisy = pending.photometric.noise
            assert (got[~noisy] - ref[~noisy]).abs().max() <= 1e-5, key
            if noisy.any():  # residual = device noise - reference noise: zero mean, std sqrt(2) x the drawn std
                stds = pending.photometric.noise_std[noisy]
                residual = (got[noisy] - ref[noisy]).flatten(1)
                ratio = residual.std(dim=1) / (2**0.5 * stds)
                assert ((ratio - 1).abs() < 0.15).all(), ratio
                assert (residual.mean(dim=1).abs() < 4 * 2**0.5 * stds / residual.shape[1] ** 0.5).all()
                shared = pending.photometric.noise_shared[noisy]  # replicated 1-channel crops: the same noise
                assert all(torch.equal(c[0], c[-1]) for c in got[noisy][shared])
    if pipeline == "masked local crops":  # the test saw masked crops being masked
        assert device.device_augmentation.local_crops.keep is not None
        assert (device.device_augmentation.local_crops.keep == 0).any()


def test_one_channel_views_travel_as_one_channel_and_are_replicated_on_the_device() -> None:
    batch = _loader_batches(5, 5, PIPELINES["1 channel views into 5"][2], device_path=True)[0]
    assert batch.global_crops.shape[1] == 1 and batch.local_crops.shape[1] == 1  # 5x fewer bytes to pin and copy
    finished = batch.finish_crops()
    assert finished.global_crops.shape[1] == 5 and torch.equal(finished.global_crops[:, 0], finished.global_crops[:, 4])
    moved = batch.to(torch.device("meta")).device_augmentation  # moving (and pinning) maps every nested tensor
    assert moved.local_crops.photometric.sigma.is_meta and moved.global_crops.mean is None


def test_the_photometric_draw_lives_in_one_place(monkeypatch) -> None:
    """Both paths draw through dinocell.pipeline.photometric.draw_photometric, in the same order."""
    calls = []
    real = photometric.draw_photometric

    def counting(*args):
        calls.append(args[1])  # the crop group
        return real(*args)

    monkeypatch.setattr(transforms, "draw_photometric", counting)
    for device_path in (False, True):
        _loader_batches(5, 5, [], device_path)
    half = len(calls) // 2
    assert half == 2 * 4 * (2 + 4) and calls[:half] == calls[half:]  # 2 batches x 4 images x 6 crops, per path
